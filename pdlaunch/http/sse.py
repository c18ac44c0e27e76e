"""Server-sent events as the OpenAI API uses them: `data: {json}\\n\\n` frames ending in `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"  # the last event of every OpenAI stream


def sse_data(data: str) -> bytes:
    """One event carrying `data` as it is (a payload relayed from another stream, or [DONE])."""
    return b"data: " + data.encode() + b"\n\n"


def sse_event(payload: Mapping[str, object]) -> bytes:
    """One event carrying `payload` as compact JSON."""
    return sse_data(json.dumps(payload, separators=(",", ":")))


class SSEParser:
    """Incremental parser: feed raw bytes as they arrive, get the `data:` payloads of complete events.

    Handles events split across chunks, CRLF line ends, comments and multi-line data fields.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk.replace(b"\r\n", b"\n")
        events: list[str] = []
        while b"\n\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n\n", 1)
            data_lines = [
                line[5:].removeprefix(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")
            ]
            if data_lines:
                events.append(b"\n".join(data_lines).decode())
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not terminated yet (a truncated stream leaves them here)."""
        return self._buffer


def parse_sse(body: bytes) -> list[str]:
    """All `data:` payloads of a complete SSE body."""
    parser = SSEParser()
    return parser.feed(body if body.endswith(b"\n\n") else body + b"\n\n")


def _ends_with_error_event(chunk: bytes) -> bool:
    """Whether the last event of `chunk` (whole SSE events) is an OpenAI error event."""
    last = chunk.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    return last.startswith(b'data: {"error"')


async def ending_with_done(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`events`, with [DONE] after an error event that ends them: every OpenAI stream ends with [DONE], an error
    mid-stream included (vLLM's too), and a client that reads until [DONE] otherwise takes the end for a cut
    connection. A stream that stops without an error event (an instance that died) is left as it is: the
    proxy tells those apart (proxy/upstream.py)."""
    last = b""
    try:
        async for chunk in events:
            last = chunk
            yield chunk
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:  # the client left: the source's own `finally` runs now, not at garbage collection
            await aclose()
    if last and _ends_with_error_event(last):
        yield DONE


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response whose `on_close` runs however it ends: finished, failed, or the client
    left before the body iterator even started (then the iterator's own `finally` never runs). SSE by
    default (an error event that ends it is followed by [DONE]: ending_with_done); another `media_type`
    (e.g. NDJSON) streams the same way."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 headers: Mapping[str, str] | None = None, media_type: str = "text/event-stream") -> None:
        sse = media_type == "text/event-stream"
        super().__init__(ending_with_done(content) if sse else content, media_type=media_type, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()

    async def close(self) -> None:
        """Run `on_close` for a response that is never sent (its body consumed elsewhere)."""
        await self._on_close()
