"""A request submitted while the engine thread fails gets an answer: the 503 of an engine that is not ready, never a
stream that nobody will feed (the thread's failure had already failed every stream it knew of)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.stats import EngineStats
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.engine_loop import EngineLoop

WAIT_S = 60.0


class FailingEngine:
    """Steps until told to fail; `check_kv_transfer_params` (what submit asks between its readiness check and
    queuing the request) is where the test makes the engine thread fail and end."""

    rank_engine_ids: list[str] = []  # what /info shows: the executor knows no ranks, no connector
    rank_nodes: list[str] = []
    connector = None

    def __init__(self) -> None:
        self.fail = threading.Event()
        self.shut_down = threading.Event()

    def check_kv_transfer_params(self, raw: object) -> None:
        self.fail.set()
        assert self.shut_down.wait(WAIT_S), "the engine thread to fail and shut its engine down"

    def is_quiescent(self) -> bool:
        return False

    def arrival_window_s(self) -> float:  # no device step in flight: the loop never waits for arrivals
        return 0.0

    def has_unfinished_requests(self) -> bool:
        return False

    def step(self) -> list[object]:
        if self.fail.is_set():
            raise RuntimeError("injected step failure")
        return []

    def stats(self) -> EngineStats:
        return {"num_running": 0, "num_waiting": 0, "num_waiting_for_kv": 0, "num_blocks_total": 8,
                "num_blocks_used": 0}  # type: ignore[typeddict-item]

    def shutdown(self) -> None:
        self.shut_down.set()


def test_a_request_submitted_as_the_engine_fails_is_refused_not_left_waiting() -> None:
    engine = FailingEngine()
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001)  # type: ignore[arg-type,return-value]
    loop.start()
    try:
        assert loop.wait_ready(WAIT_S), "the engine loop to start"

        async def submit() -> object:
            stream = loop.submit("r", [1, 2, 3], SamplingParams())
            return await asyncio.wait_for(stream.queue.get(), 10)  # an answered stream has its item in ms

        with pytest.raises(OpenAIError) as info:
            asyncio.run(submit())
        assert info.value.status == 503 and loop.state == "failed" and loop.num_pending == 0
    finally:
        loop.stop()


class AbortFails:
    def abort_request(self, request_id: str) -> None:
        raise RuntimeError("injected abort failure")


def test_an_abort_that_raises_is_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """An exception out of abort_request (its blocks may not have come back) was logged at debug level, so
    nobody saw it; a request not running here is not an exception (abort_request returns None)."""
    loop = EngineLoop(lambda: AbortFails())  # type: ignore[arg-type, return-value]
    with caplog.at_level("DEBUG", logger="pdlaunch.server"):
        loop._abort(AbortFails(), "req-1")  # type: ignore[arg-type]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "aborting request req-1 failed" in errors[0].getMessage()
    assert errors[0].exc_info is not None and "injected abort failure" in str(errors[0].exc_info[1])
    assert loop.num_aborted == 0
