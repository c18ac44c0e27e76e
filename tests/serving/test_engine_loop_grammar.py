"""The engine loop builds a structured-output request's grammar matcher on a grammar thread and queues the request
once it is built (server/engine_loop.py). Here with an engine stand-in whose matcher build is held: the engine
thread steps meanwhile, the request reaches add_request with that matcher, and a stop while builds wait answers
every such request with a 503 (no traceback, no request left without an answer)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.structured_output import StructuredOutput
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.request_stream import Accepted, StreamItem
from tests.serving.helpers import wait_for
from tests.serving.test_engine_loop_idle import CountingEngine

TIMEOUT = 60.0  # a loaded 2-core machine
STRUCTURED = SamplingParams(max_tokens=3, structured_output=StructuredOutput(kind="choice", value='["yes", "no"]',
                                                                             field="guided_choice"))


class HeldGrammarEngine(CountingEngine):
    """The idle tests' engine stand-in, whose `grammar_matcher` waits for `release`; `add_request` records."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.building = threading.Semaphore(0)
        self.added: list[tuple[str, Any]] = []

    def grammar_matcher(self, spec: StructuredOutput) -> str:
        self.building.release()
        assert self.release.wait(TIMEOUT), "the test never released the grammar build"
        return f"matcher of {spec.field}"

    def check_kv_transfer_params(self, params: object) -> None:
        return None

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams, kv: object,
                    matcher: object = None) -> None:
        self.added.append((request_id, matcher))


def _started(engine: HeldGrammarEngine) -> EngineLoop:
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001, quiescent_wait_s=0.01)  # type: ignore[arg-type,return-value]
    loop.start()
    assert loop.wait_ready(TIMEOUT), "the engine loop to start"
    return loop


async def _first(queue: asyncio.Queue[StreamItem]) -> StreamItem:
    return await asyncio.wait_for(queue.get(), TIMEOUT)


def test_the_request_waits_for_its_matcher_off_the_engine_thread_then_gets_it() -> None:
    engine = HeldGrammarEngine()
    loop = _started(engine)

    async def run() -> StreamItem:
        stream = loop.submit("r1", [1, 2], STRUCTURED)
        assert await asyncio.to_thread(engine.building.acquire, True, TIMEOUT), "the build never started"
        steps = engine.steps
        await asyncio.to_thread(wait_for, lambda: engine.steps >= steps + 3, "engine steps during the build",
                                TIMEOUT)
        assert engine.added == []
        engine.release.set()
        return await _first(stream.queue)

    try:
        assert isinstance(asyncio.run(run()), Accepted)
        assert engine.added == [("r1", "matcher of guided_choice")]
    finally:
        engine.release.set()
        loop.stop()


def test_a_stop_while_builds_wait_answers_each_with_a_503(caplog: pytest.LogCaptureFixture) -> None:
    engine = HeldGrammarEngine()
    loop = _started(engine)
    caplog.set_level(logging.ERROR, logger="pdlaunch.server")

    async def run() -> list[StreamItem]:
        # two builds hold both grammar threads, the third waits for one: stop() cancels it
        streams = [loop.submit(f"r{i}", [1, 2], STRUCTURED) for i in range(3)]
        for _ in range(2):
            assert await asyncio.to_thread(engine.building.acquire, True, TIMEOUT), "a build never started"
        await asyncio.to_thread(loop.stop, TIMEOUT)
        return [await _first(s.queue) for s in streams]

    try:
        answers = asyncio.run(run())
    finally:
        engine.release.set()
    assert all(isinstance(a, OpenAIError) and a.status == 503 and a.code == "shutting_down" for a in answers), answers
    assert engine.added == [] and not caplog.records, caplog.records


def test_a_request_aborted_while_its_grammar_builds_is_counted_aborted_and_never_added() -> None:
    engine = HeldGrammarEngine()
    loop = _started(engine)

    async def run() -> None:
        loop.submit("r1", [1, 2], STRUCTURED)
        assert await asyncio.to_thread(engine.building.acquire, True, TIMEOUT), "the build never started"
        loop.abort("r1")
        engine.release.set()  # the build ends after the abort: the request is dropped when it is queued

    try:
        asyncio.run(run())
        wait_for(lambda: loop.num_aborted == 1, "the aborted request to be counted", TIMEOUT)
        assert engine.added == []
    finally:
        engine.release.set()
        loop.stop()
