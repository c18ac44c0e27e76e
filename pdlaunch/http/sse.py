"""Server-sent events as the OpenAI API uses them: `data: {json}\\n\\n` frames ending in `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import partial

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pdlaunch.http import stalled_reader

log = logging.getLogger("pdlaunch.http")

DONE = b"data: [DONE]\n\n"  # the last event of every OpenAI stream


def sse_data(data: str) -> bytes:
    """One event carrying `data` as it is (a payload relayed from another stream, or [DONE]): each of its lines in a
    `data:` field of its own (SSEParser joins a foreign event's several `data:` lines with "\\n"; a line without the
    field would be dropped by the client)."""
    if "\n" not in data:
        return b"data: " + data.encode() + b"\n\n"
    return b"".join(b"data: " + line.encode() + b"\n" for line in data.split("\n")) + b"\n"


def sse_event(payload: Mapping[str, object]) -> bytes:
    """One event carrying `payload` as compact JSON."""
    return sse_data(json.dumps(payload, separators=(",", ":")))


# The longest event a parser holds before it gives up: a long prompt's prompt_logprobs event can pass 100 MiB; a
# stream that never ends its event (a broken instance) must not grow the proxy's memory until the deadline.
MAX_EVENT_BYTES = 1 << 30


class SSEEventTooLarge(ValueError):
    """An event passed the parser's byte limit without ending."""


class SSEParser:
    """Incremental parser: feed raw bytes as they arrive, get the `data:` payloads of complete events.

    Handles events split across chunks (a CRLF split between two included), CRLF line ends, comments and
    multi-line data fields. Each byte is searched once, however many chunks an event arrives in.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()  # normalized to LF line ends
        self._scanned = 0  # no event ends inside _buffer[:_scanned]
        self._held_cr = False  # the last chunk ended with CR: a CRLF may continue in the next
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[str]:
        """The payloads of the events `chunk` completes; SSEEventTooLarge once an unfinished event passes the
        limit, UnicodeDecodeError for an event that is not UTF-8."""
        if self._held_cr:
            chunk = b"\r" + chunk
        self._held_cr = chunk.endswith(b"\r")
        self._buffer += (chunk[:-1] if self._held_cr else chunk).replace(b"\r\n", b"\n")
        events: list[str] = []
        start = 0
        end = self._buffer.find(b"\n\n", max(0, self._scanned - 1))
        while end >= 0:
            data_lines = [line[5:].removeprefix(b" ") for line in bytes(self._buffer[start:end]).split(b"\n")
                          if line.startswith(b"data:")]
            if data_lines:
                events.append(b"\n".join(data_lines).decode())
            start = end + 2
            end = self._buffer.find(b"\n\n", start)
        del self._buffer[:start]
        self._scanned = len(self._buffer)
        if self._scanned > self._max:
            raise SSEEventTooLarge(f"a stream event passed {self._max} bytes without ending")
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not terminated yet (a truncated stream leaves them here)."""
        return bytes(self._buffer) + (b"\r" if self._held_cr else b"")


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
    """A streaming response whose `on_close` runs however it ends: finished, failed, the client left
    before the body iterator even started (then the iterator's own `finally` never runs), or it stopped
    reading (a send waited SEND_STALL_SECONDS: the stream ends unfinished, stalled_reader.py). SSE by
    default (an error event that ends it is followed by [DONE]: ending_with_done); another `media_type`
    (e.g. NDJSON) streams the same way."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 headers: Mapping[str, str] | None = None, media_type: str = "text/event-stream") -> None:
        sse = media_type == "text/event-stream"
        super().__init__(ending_with_done(content) if sse else content, media_type=media_type, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = partial(StreamingResponse.__call__, self, scope, receive)
        try:
            if not await stalled_reader.stream_while_read(stream, send):
                # uvicorn then closes the connection, and would log an ERROR that the response is incomplete:
                # this warning says why instead (stalled_reader.quiet_incomplete_response_error)
                stalled_reader.quiet_incomplete_response_error()
                log.warning("%s %s: the client read nothing of the stream for %g s; the stream ends unfinished",
                            scope.get("method"), scope.get("path"), stalled_reader.SEND_STALL_SECONDS)
        finally:
            await self._on_close()

    async def close(self) -> None:
        """Run `on_close` for a response that is never sent (its body consumed elsewhere)."""
        await self._on_close()
