"""An engine step that raises fails the instance and every request open in it (engine_thread.py): each of those
requests ends as an abort, counted in /info's num_aborted_requests (not in vllm:request_success, as vLLM), once:
the ones the engine ran, one whose client left while the failing step ran (its abort still queued), one the engine
never took (its grammar still built). One that finished before the failure keeps its end, and neither a client
leaving after the failure nor the server's stop counts any of them again. The registry is
the process's: deltas of this process's series (test_engine_counts.counts)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.request_stream import RequestStream, StreamItem
from tests.serving.helpers import wait_for
from tests.serving.test_engine_counts import HOLD, STRUCTURED, TIMEOUT, ScriptedEngine, counts, delta


class FailingEngine(ScriptedEngine):
    """ScriptedEngine whose step, once `fail` is set, says it began (`failing`) and raises when `go` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = threading.Event()
        self.failing = threading.Event()
        self.go = threading.Event()

    def step(self) -> list[object]:
        if not self.fail.is_set():
            return super().step()
        self.failing.set()
        assert self.go.wait(TIMEOUT), "the test never let the failing step go on"
        raise RuntimeError("injected step failure")


async def _until(stream: RequestStream, end: Callable[[StreamItem], bool]) -> StreamItem:
    """The stream's first item that `end` accepts (its Accepted and outputs before it read)."""
    while True:
        item = await asyncio.wait_for(stream.queue.get(), TIMEOUT)
        if end(item):
            return item


def _finished(item: StreamItem) -> bool:
    return isinstance(item, RequestOutput) and item.finished


def _failed(item: StreamItem) -> bool:
    return isinstance(item, OpenAIError)


def test_an_engine_failure_counts_each_open_request_once_as_an_abort() -> None:
    engine = FailingEngine()
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001, quiescent_wait_s=0.01)  # type: ignore[arg-type,return-value]
    loop.start()
    try:
        assert loop.wait_ready(TIMEOUT), "the engine loop to start"
        before = counts()

        async def run() -> list[StreamItem]:
            await _until(loop.submit("done", [1, 2], SamplingParams(max_tokens=2)), _finished)  # by length
            streams = [loop.submit("open", [HOLD, 2, 3], SamplingParams(max_tokens=2)),
                       loop.submit("leaving", [HOLD, 2], SamplingParams(max_tokens=1))]
            await asyncio.to_thread(wait_for, lambda: engine.generated == 5, "the 5 tokens of 3 requests", TIMEOUT)
            streams.append(loop.submit("structured", [1, 2], STRUCTURED))  # queued behind its grammar build
            assert await asyncio.to_thread(engine.building.acquire, True, TIMEOUT), "the build never started"
            engine.fail.set()
            assert await asyncio.to_thread(engine.failing.wait, TIMEOUT), "the failing step never began"
            loop.abort("leaving")  # the client leaves while the failing step runs: its abort stays queued
            engine.go.set()
            ends = [await _until(streams[i], _failed) for i in (0, 2)]
            engine.release.set()  # the build ends after the failure: its request is not counted again
            loop.abort("open")  # its client leaves after the error: nothing more to count
            return ends

        ends = asyncio.run(run())
        assert loop.state == "failed"
        assert all(isinstance(e, OpenAIError) and e.code == "engine_failed" for e in ends), ends
        expected = {"prompt": 2 + 3 + 2, "generation": 2 + 2 + 1, "length": 1, "abort": 0, "error": 0}
        assert delta(before) == expected and loop.num_aborted == 3
    finally:
        engine.go.set()
        engine.release.set()
        loop.stop()
    assert delta(before) == expected and loop.num_aborted == 3  # the stop after the failure counted none again


@pytest.mark.parametrize("leave", [False, True])
def test_a_request_that_finished_counts_its_end_once(leave: bool) -> None:
    """A client that leaves once its request finished (its abort comes after the finished output, or races it on
    the engine thread: the request was no longer running) and a stop after it add no abort."""
    engine = ScriptedEngine()
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001, quiescent_wait_s=0.01)  # type: ignore[arg-type,return-value]
    loop.start()
    try:
        assert loop.wait_ready(TIMEOUT), "the engine loop to start"
        before = counts()

        async def run() -> None:
            stream = loop.submit("r", [1, 2, 3], SamplingParams(max_tokens=3))
            await asyncio.to_thread(wait_for, lambda: engine.generated == 3, "the request's 3 tokens", TIMEOUT)
            if leave:
                loop.abort("r")  # before or after the engine thread handed out its finished output
            else:
                await _until(stream, _finished)

        asyncio.run(run())
        wait_for(lambda: not loop.counts.running, "the request's end to be counted", TIMEOUT)
    finally:
        loop.stop()
    assert delta(before) == {"prompt": 3, "generation": 3, "length": 1, "abort": 0, "error": 0}
    assert loop.num_aborted == 0
