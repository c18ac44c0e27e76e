"""EngineLoop.call past its timeout: the 503 names what was asked and whether it still runs, and a call the
engine thread had not started yet is dropped (a /sleep that timed out used to put the instance to sleep later,
while the server still routed requests to it)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.test_engine_loop_idle import CountingEngine

TIMEOUT = 60.0  # for conditions that hold at once on an idle machine


class BlockingEngine(CountingEngine):
    """A step that holds the engine thread until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.quiescent = False
        self.in_step = threading.Event()
        self.release = threading.Event()
        self.block = False

    def step(self) -> list[object]:
        if self.block:
            self.in_step.set()
            self.release.wait(TIMEOUT)
        return super().step()


def test_a_call_that_timed_out_before_it_started_never_runs_and_says_what_it_was() -> None:
    engine = BlockingEngine()
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001)  # type: ignore[arg-type,return-value]
    loop.start()
    assert loop.wait_ready(TIMEOUT), "the engine loop to start"
    ran: list[str] = []
    try:
        engine.block = True
        assert engine.in_step.wait(TIMEOUT), "a step that holds the engine thread"

        async def abandoned() -> None:
            await loop.call(lambda e: ran.append("sleep"), timeout=0.05, what="sleep (level 1)")

        with pytest.raises(OpenAIError) as err:
            asyncio.run(abandoned())
        assert err.value.status == 503
        assert "did not finish sleep (level 1) within 0.05s; it had not started" in err.value.message
        engine.block = False
        engine.release.set()

        async def later() -> str:  # queued after the abandoned call: it has run once this answers
            return await loop.call(lambda e: "done", timeout=TIMEOUT)

        assert asyncio.run(later()) == "done"
        assert ran == []
    finally:
        engine.release.set()
        loop.stop()


def test_a_call_that_timed_out_while_running_says_it_still_runs() -> None:
    engine = BlockingEngine()
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001)  # type: ignore[arg-type,return-value]
    loop.start()
    assert loop.wait_ready(TIMEOUT), "the engine loop to start"
    finish = threading.Event()
    try:
        def wake_up(_: object) -> bool:
            return finish.wait(TIMEOUT)

        async def slow() -> None:  # long enough for an idle engine thread to start it on a loaded machine
            await loop.call(wake_up, timeout=3.0)

        with pytest.raises(OpenAIError) as err:
            asyncio.run(slow())
        assert "did not finish wake_up within 3s; it still runs there" in err.value.message
    finally:
        finish.set()
        loop.stop()
