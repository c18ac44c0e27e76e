"""A call queued for the engine thread (what /sleep, /wake_up, /is_sleeping and the KV release routes run there) as
that thread fails or stops is answered at once with the error a request gets then, and one made after it ended is
refused at once: neither waits out its timeout for a thread that will never run it. Each request and call gets its
own exception object then, never one shared (each raise appends its frames to the exception's traceback)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.stats import EngineStats
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.shutdown_answer import SHUTTING_DOWN_RETRY_AFTER_S, shutting_down
from pdlaunch.server.engine_call import Call
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.request_stream import StreamItem
from tests.serving.helpers import wait_for

WAIT_S = 60.0
CALL_TIMEOUT_S = 30.0  # what the call would wait for an answer that never comes
ANSWERED_WITHIN_S = 10.0  # an answered call's error comes in ms; far below CALL_TIMEOUT_S


class HeldEngine:
    """Its step holds the engine thread until released, then raises when told to fail."""

    rank_engine_ids: list[str] = []  # what /info shows: the executor knows no ranks, no connector
    rank_nodes: list[str] = []
    connector = None

    def __init__(self) -> None:
        self.in_step, self.release, self.fail = threading.Event(), threading.Event(), threading.Event()

    def is_quiescent(self) -> bool:
        return False

    def arrival_window_s(self) -> float:  # no device step in flight: the loop never waits for arrivals
        return 0.0

    def has_unfinished_requests(self) -> bool:
        return False

    def step(self) -> list[object]:
        self.in_step.set()
        assert self.release.wait(WAIT_S), "the test never released the step"
        if self.fail.is_set():
            raise RuntimeError("injected step failure")
        return []

    def take_admitted(self) -> list[object]:  # no PD decode admitted with its first token
        return []

    def stats(self) -> EngineStats:
        return {"num_blocks_total": 8}  # type: ignore[typeddict-item]

    def shutdown(self) -> None:
        pass


def _started(engine: HeldEngine) -> EngineLoop:
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001)  # type: ignore[arg-type,return-value]
    loop.start()
    assert loop.wait_ready(WAIT_S), "the engine loop to start"
    assert engine.in_step.wait(WAIT_S), "the engine thread to enter a step"
    return loop


async def _call_while(loop: EngineLoop, end: Callable[[], None]) -> tuple[OpenAIError, float]:
    """Queue a call while a step holds the engine thread, then end the thread with `end` (run in a thread): the
    call's error and how long it took to come."""
    start = time.monotonic()
    call = asyncio.ensure_future(loop.call(lambda engine: "ran", timeout=CALL_TIMEOUT_S, what="a test call"))
    await asyncio.sleep(0)  # the call runs up to its wait: queued behind the held step
    ending = asyncio.ensure_future(asyncio.to_thread(end))
    with pytest.raises(OpenAIError) as info:
        await call
    took = time.monotonic() - start
    await ending
    return info.value, took


def test_a_call_queued_as_the_engine_fails_gets_the_failure_at_once() -> None:
    engine = HeldEngine()
    loop = _started(engine)
    try:
        def fail() -> None:
            engine.fail.set()
            engine.release.set()

        error, took = asyncio.run(_call_while(loop, fail))
        assert took < ANSWERED_WITHIN_S, f"the call waited {took:.1f}s for a failed engine thread"
        assert (error.status, error.code) == (500, "engine_failed") and "injected step failure" in error.message
        later, took = asyncio.run(_call_while(loop, lambda: None))
        assert took < ANSWERED_WITHIN_S and (later.status, later.code) == (503, "not_ready")
        assert "state: failed" in later.message
    finally:
        engine.release.set()
        loop.stop()


def test_a_call_queued_as_the_engine_stops_gets_the_shutdown_at_once() -> None:
    engine = HeldEngine()
    loop = _started(engine)
    stopper = threading.Thread(target=loop.stop)  # stop() joins the engine thread: the held step must end first

    def stop() -> None:
        stopper.start()
        wait_for(loop._stop.is_set, "stop() to ask the engine thread to stop")
        engine.release.set()  # the step ends; the loop sees the stop before it drains the call

    try:
        error, took = asyncio.run(_call_while(loop, stop))
        assert took < ANSWERED_WITHIN_S, f"the call waited {took:.1f}s for a stopped engine thread"
        assert (error.status, error.code) == (503, "shutting_down")
    finally:
        engine.release.set()
        stopper.join(WAIT_S)


def test_a_call_the_engine_stop_fails_answers_with_retry_after() -> None:
    """The 503 shutting_down a call gets as the engine stops (a /sleep, a KV release) carries Retry-After, as a
    request's does: each caller gets its own copy of the error, of the same kind."""
    async def failed() -> tuple[OpenAIError, OpenAIError]:
        first, second = Call(lambda engine: "ran", "a test call"), Call(lambda engine: "ran", "a test call")
        error = shutting_down("the engine stopped")
        first.fail(error)
        second.fail(error)
        errors = []
        for call in (first, second):
            with pytest.raises(OpenAIError) as info:
                await call.result(CALL_TIMEOUT_S)
            errors.append(info.value)
        return errors[0], errors[1]

    one, other = asyncio.run(failed())
    assert one is not other
    for error in (one, other):
        assert (error.status, error.code, error.message) == (503, "shutting_down", "the engine stopped")
        assert error.response().headers.get("retry-after") == str(SHUTTING_DOWN_RETRY_AFTER_S), error


class TakingRequests(HeldEngine):
    """A HeldEngine whose requests submit queues (it checks their kv_transfer_params before it queues them)."""

    def check_kv_transfer_params(self, raw: object) -> None:
        return None


@pytest.mark.parametrize("end", ["fail", "stop"])
def test_each_open_request_gets_its_own_error_as_the_engine_thread_ends(end: str) -> None:
    """The engine thread's end put one exception object into every open request's stream: each handler that raised
    it appended its frames to that one traceback (memory grew with the number of streams; the tracebacks logged were
    mixed). Each stream gets its own now, of the same type, status, message, code and Retry-After."""
    engine = TakingRequests()
    loop = _started(engine)
    stopper = threading.Thread(target=loop.stop)  # stop() joins the engine thread: the held step must end first

    def end_thread() -> None:
        if end == "fail":
            engine.fail.set()
        else:
            stopper.start()
            wait_for(loop._stop.is_set, "stop() to ask the engine thread to stop")
        engine.release.set()

    async def first_items() -> list[StreamItem]:
        streams = [loop.submit(f"req-{i}", [1, 2, 3], SamplingParams()) for i in range(2)]  # queued behind the step
        await asyncio.to_thread(end_thread)
        return [await asyncio.wait_for(stream.queue.get(), WAIT_S) for stream in streams]

    try:
        one, other = asyncio.run(first_items())
    finally:
        engine.release.set()
        if stopper.is_alive():
            stopper.join(WAIT_S)
        loop.stop()
    assert isinstance(one, OpenAIError) and isinstance(other, OpenAIError), (one, other)
    assert one is not other
    assert type(one) is type(other)
    assert vars(one) == vars(other) and one.args == other.args
    expected = (500, "engine_failed") if end == "fail" else (503, "shutting_down")
    assert (one.status, one.code) == expected, one
    if end == "stop":
        assert getattr(one, "retry_after_s", None) == SHUTTING_DOWN_RETRY_AFTER_S


def test_a_call_whose_caller_is_cancelled_before_it_started_never_runs() -> None:
    """A caller cancelled while its call waited behind a step (its request cut at shutdown, or its client gone) left
    the call queued, and the engine thread ran it later for nobody: a /sleep answered 503 shutting_down could still
    put the instance to sleep. It is dropped now, as a call whose caller timed out is."""
    engine = HeldEngine()
    loop = _started(engine)
    ran: list[str] = []

    async def cancel_then_drain() -> str:
        waiting = asyncio.ensure_future(loop.call(lambda engine: ran.append("cancelled call"), what="a test call"))
        while not loop._calls:  # queued behind the held step
            await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        engine.release.set()
        # commands run in order: once this later call has its answer, the engine thread has passed the first one
        return await loop.call(lambda engine: "later call ran", timeout=CALL_TIMEOUT_S, what="a later call")

    try:
        assert asyncio.run(asyncio.wait_for(cancel_then_drain(), WAIT_S)) == "later call ran"
        assert ran == []
    finally:
        engine.release.set()
        loop.stop()
