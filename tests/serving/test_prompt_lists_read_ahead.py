"""A list of prompts streamed through PD (prompt_lists.MergedStream) reads its prompts' streams only a bounded
number of events ahead of the client: a slow client made the proxy read every prompt's stream whole into memory
(an unbounded queue), where the stream of one prompt waits for the client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pdlaunch.http.sse import ClosingStreamingResponse, parse_sse, sse_event
from pdlaunch.proxy.prompt_lists import READ_AHEAD_EVENTS, MergedStream

EVENTS = 3000  # per prompt


def test_a_slow_client_holds_the_prompts_streams_back() -> None:
    read = [0, 0]  # events each prompt's stream handed to the merged one

    async def prompt_stream(p: int) -> AsyncIterator[bytes]:
        for _ in range(EVENTS):
            read[p] += 1
            yield sse_event({"id": f"cmpl-{p}", "choices": [{"index": 0, "text": "t", "finish_reason": None}]})
        yield b"data: [DONE]\n\n"

    async def nothing() -> None:
        pass

    async def client() -> tuple[int, list[str]]:
        merged = MergedStream([ClosingStreamingResponse(prompt_stream(p), on_close=nothing) for p in (0, 1)], 1,
                              "cmpl-m")
        events = merged.events()
        first = await anext(events)
        for _ in range(100):  # the client reads no further: every stream runs as far as the merged one lets it
            await asyncio.sleep(0)
        held = sum(read)
        rest = [event async for event in events]
        return held, parse_sse(first + b"".join(rest))

    held, payloads = asyncio.run(asyncio.wait_for(client(), 60))
    # the queue, plus what each pump and each stream's [DONE] wrapper hold while they wait
    assert held <= READ_AHEAD_EVENTS + 6, held
    assert len(payloads) == 2 * EVENTS + 1 and payloads[-1] == "[DONE]"  # then the client reads them all
