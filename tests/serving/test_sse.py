"""SSE framing: what the server writes is what the proxy's incremental parser reads back, however split."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from pdlaunch.http.sse import DONE, SSEParser, parse_sse, sse_event


def test_event_roundtrip_with_done() -> None:
    body = sse_event({"a": 1}) + sse_event({"text": "two\nlines"}) + DONE
    events = parse_sse(body)
    assert [json.loads(e) for e in events[:2]] == [{"a": 1}, {"text": "two\nlines"}]
    assert events[2] == "[DONE]"


def test_crlf_comments_and_multiline_data() -> None:
    parser = SSEParser()
    events = parser.feed(b": keep-alive\r\n\r\ndata: first\r\ndata: second\r\n\r\nevent: x\ndata:{\"k\":2}\n\n")
    assert events == ["first\nsecond", '{"k":2}']
    assert parser.pending == b""


def test_truncated_event_stays_pending() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"a"') == []
    assert parser.pending == b'data: {"a"'
    assert parser.feed(b": 1}\n\n") == ['{"a": 1}']


@settings(max_examples=60, deadline=None)
@given(
    payloads=st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_any_chunking_gives_the_same_events(payloads: list[dict[str, str]], cuts: list[int]) -> None:
    body = b"".join(sse_event(p) for p in payloads) + DONE
    parser = SSEParser()
    events: list[str] = []
    start = 0
    for cut in sorted(set(c for c in cuts if c < len(body))) + [len(body)]:
        events += parser.feed(body[start:cut])
        start = cut
    assert [json.loads(e) for e in events[:-1]] == payloads
    assert events[-1] == "[DONE]"


def _served(chunks: list[bytes], media_type: str = "text/event-stream") -> tuple[bytes, list[str]]:
    """The body a client reads from a ClosingStreamingResponse over `chunks` (served by an ASGI app), and the
    calls of its source's `finally` and of on_close."""
    import asyncio
    from collections.abc import AsyncIterator

    import httpx
    from fastapi import FastAPI

    from pdlaunch.http.sse import ClosingStreamingResponse

    calls: list[str] = []

    async def source() -> AsyncIterator[bytes]:
        try:
            for chunk in chunks:
                yield chunk
        finally:
            calls.append("source closed")

    async def closed() -> None:
        calls.append("on_close")

    app = FastAPI()
    app.get("/stream")(lambda: ClosingStreamingResponse(source(), on_close=closed, media_type=media_type))

    async def read() -> bytes:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return (await client.get("/stream")).content

    return asyncio.run(read()), calls


def test_a_stream_ended_by_an_error_event_ends_with_done() -> None:
    """OpenAI's streams end with [DONE], after an error event too (vLLM's do): a client that reads until [DONE]
    took a stream that ended with the error event for a cut connection."""
    error = sse_event({"error": {"message": "KV transfer failed", "type": "bad_gateway_error", "param": None,
                                 "code": 502}})
    body, calls = _served([sse_event({"choices": [{"text": "a"}]}), error])
    assert parse_sse(body) == [json.dumps({"choices": [{"text": "a"}]}, separators=(",", ":")),
                               error[6:-2].decode(), "[DONE]"]
    assert calls == ["source closed", "on_close"]
    # already ended by [DONE]; cut short without an error (the proxy's sign of a dead instance); not SSE: as sent
    for chunks, media_type in [([sse_event({"a": 1}), error, DONE], "text/event-stream"),
                               ([sse_event({"a": 1})], "text/event-stream"),
                               ([b'{"error": {}}\n'], "application/x-ndjson")]:
        assert _served(chunks, media_type)[0] == b"".join(chunks)
