"""The engine thread tells a PD decode request's prefill to drop its hold when the request ends before
engine.add_request took it (server/engine_thread.py `_add`), but not when a later request of the same id is on its
way to the engine: that one may carry the same params (engine_requests.add_request's rule for an id in use). Here
with the grammar tests' engine stand-in, whose matcher build is held; the real 1P1D paths are in
test_server_ended_decode_release_e2e.py."""

from __future__ import annotations

import asyncio
from typing import Any

from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import wait_for
from tests.serving.test_engine_loop_grammar import STRUCTURED, TIMEOUT, HeldGrammarEngine

PARAMS = object()  # what check_kv_transfer_params parsed a decode leg's params into: handed on as they are


class DecodeEngine(HeldGrammarEngine):
    """A decode's stand-in: its requests carry params; release_unloaded records."""

    def __init__(self) -> None:
        super().__init__()
        self.released: list[tuple[str, list[int], Any]] = []

    def check_kv_transfer_params(self, params: object) -> Any:  # type: ignore[override]
        return PARAMS

    def release_unloaded(self, request_id: str, prompt: list[int], kv: object) -> None:
        self.released.append((request_id, prompt, kv))


def _started(engine: DecodeEngine) -> EngineLoop:
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001, quiescent_wait_s=0.01)  # type: ignore[arg-type,return-value]
    loop.start()
    assert loop.wait_ready(TIMEOUT), "the engine loop to start"
    return loop


def test_a_decode_request_aborted_while_its_grammar_builds_releases_its_params() -> None:
    engine = DecodeEngine()
    loop = _started(engine)

    async def run() -> None:
        loop.submit("r1", [1, 2], STRUCTURED, {"do_remote_prefill": True})
        assert await asyncio.to_thread(engine.building.acquire, True, TIMEOUT), "the build never started"
        loop.abort("r1")
        engine.release.set()

    try:
        asyncio.run(run())
        wait_for(lambda: engine.released, "the aborted request's params to be released", TIMEOUT)
        assert engine.released == [("r1", [1, 2], PARAMS)] and engine.added == []
    finally:
        engine.release.set()
        loop.stop()


def test_an_aborted_request_whose_id_came_again_releases_nothing() -> None:
    engine = DecodeEngine()
    loop = _started(engine)

    async def run() -> None:
        loop.submit("r1", [1, 2], STRUCTURED, {"do_remote_prefill": True})
        assert await asyncio.to_thread(engine.building.acquire, True, TIMEOUT), "the build never started"
        loop.abort("r1")
        loop.submit("r1", [1, 2], STRUCTURED, {"do_remote_prefill": True})  # the same leg again
        assert await asyncio.to_thread(engine.building.acquire, True, TIMEOUT), "the second build never started"
        engine.release.set()

    try:
        asyncio.run(run())
        wait_for(lambda: engine.added, "the second request to be added", TIMEOUT)
        wait_for(lambda: loop.num_aborted == 1, "the first request to be counted aborted", TIMEOUT)
        asyncio.run(loop.call(lambda _: None, timeout=TIMEOUT))  # after both adds: the first one's _add has ended
        assert engine.released == [] and engine.added == [("r1", "matcher of guided_choice")]
    finally:
        engine.release.set()
        loop.stop()
