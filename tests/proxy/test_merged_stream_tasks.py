"""A list of prompts streamed through PD (prompt_lists.MergedStream) reads each prompt's stream in a task of its
own, at most READ_AHEAD_EVENTS ahead of the client. When the merged stream ends early (the client left, or one
prompt's error event ends it) while those tasks wait for room in the full read-ahead queue, every one of them
ends too. Before, a cancelled task went on to wait, forever, for room for its end mark in a queue nobody read:
two tasks per such request (with the prompts' streams and up to READ_AHEAD_EVENTS events) were never freed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from pdlaunch.http.sse import ClosingStreamingResponse, sse_event
from pdlaunch.proxy.prompt_lists import READ_AHEAD_EVENTS, MergedStream

EVENTS = 4 * READ_AHEAD_EVENTS  # per prompt: more than the queue holds
WAIT_S = 30.0  # a bound for the tasks to end; they end within a few loop turns


async def _prompt_stream(p: int, error_first: bool = False) -> AsyncIterator[bytes]:
    if error_first:
        yield sse_event({"error": {"message": f"prompt {p} failed", "type": "bad_gateway_error", "code": "x"}})
    for _ in range(EVENTS):
        yield sse_event({"id": f"cmpl-{p}", "choices": [{"index": 0, "text": "t", "finish_reason": None}]})
    yield b"data: [DONE]\n\n"


async def _left_behind(before: set[asyncio.Task[object]]) -> list[asyncio.Task[object]]:
    """The tasks started since `before` that have not ended within WAIT_S."""
    async def ended() -> None:
        while [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]:
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(ended(), WAIT_S)
    except TimeoutError:
        pass
    return [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]


def test_every_prompt_reader_ends_when_the_client_leaves() -> None:
    closed: list[int] = []

    async def client() -> list[asyncio.Task[object]]:
        before = set(asyncio.all_tasks())

        def on_close(p: int) -> ClosingStreamingResponse:
            async def close() -> None:
                closed.append(p)
            return ClosingStreamingResponse(_prompt_stream(p), on_close=close)

        events = MergedStream([on_close(0), on_close(1)], 1, "cmpl-m").events()
        await anext(events)
        for _ in range(100):  # the readers fill the queue meanwhile and wait for room
            await asyncio.sleep(0)
        await events.aclose()  # the client left
        return await _left_behind(before)

    left = asyncio.run(client())
    assert left == [], f"tasks left running after the client left: {[t.get_coro() for t in left]}"
    assert sorted(closed) == [0, 1]


def test_every_prompt_reader_ends_when_an_error_event_ends_the_stream() -> None:
    async def nothing() -> None:
        pass

    async def client() -> tuple[list[bytes], list[asyncio.Task[object]]]:
        before = set(asyncio.all_tasks())
        streams = [ClosingStreamingResponse(_prompt_stream(0), on_close=nothing),
                   ClosingStreamingResponse(_prompt_stream(1, error_first=True), on_close=nothing)]
        events = MergedStream(streams, 1, "cmpl-m").events()
        first = await anext(events)
        for _ in range(100):  # prompt 0's reader fills the queue behind the error event
            await asyncio.sleep(0)
        received = [first] + [event async for event in events]
        return received, await _left_behind(before)

    received, left = asyncio.run(client())
    assert any(b'"error"' in e for e in received) and b'"error"' in received[-1], received[-1]
    assert json.loads(received[-1][6:])["error"]["message"] == "prompt 1 failed"
    assert left == [], f"tasks left running after the error event: {[t.get_coro() for t in left]}"
