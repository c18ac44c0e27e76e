"""A bound on the wait for a request's headers, which uvicorn does not have.

uvicorn times out a connection only between two requests (timeout_keep_alive, and only until a byte of the
next one arrives): a client that connects and sends nothing, or sends its headers a byte now and then (a
slowloris), held its connection and file descriptor forever, and enough of them left the process none to
accept the proxy's requests with. `HeaderTimeoutProtocol` (uvicorn's h11 protocol, given as uvicorn.Config's
`http`) closes a connection whose request headers have not all come HEADER_TIMEOUT_SECONDS after it opened or
after the first byte of a request on a kept-alive connection: with a 408 naming the wait when part of them came,
silently when nothing did (as uvicorn ends an idle kept-alive connection). h11 bounds the headers' size (16 KiB).
The body's own wait is BodyLimit's (limits.py). A request answered before its body was read (a 401/403 of access
control, a 413 past the size limit, BodyLimit's 408) gets the same bound for the rest of that body, from its first
byte after the answer: uvicorn reads and drops it, and each byte cancelled its keep-alive timeout, so a client that
sent one now and then held the connection forever.

It also sends each response's head together with the start of its body (held_head.py): one send, one wakeup
of the reader.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pdlaunch.http.errors import error_body
from pdlaunch.http.held_head import HeldHeadTransport

HEADER_TIMEOUT_SECONDS = 30.0


def _timeout_response() -> bytes:
    body = json.dumps(error_body(408, f"the request's headers did not all arrive within {HEADER_TIMEOUT_SECONDS:g} s",
                                 code="request_timeout")).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11), closing a connection whose request headers take too long; a response's
    head goes out with its body (held_head.py)."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeldHeadTransport(transport, self.loop))
        self._wait_for_headers()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # a request's first bytes on a kept-alive connection
            self._wait_for_headers()
        super().data_received(data)
        # Still waited for: the next request's headers (this data ended an unread body and began them, or ended it
        # alone: uvicorn's keep-alive timeout was cancelled by it), or the rest of a body nobody reads.
        if self.conn.their_state is h11.IDLE or self._unread_body():
            self._wait_for_headers()
        else:  # its headers came (or the connection failed or closed)
            self._stop_waiting()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _wait_for_headers(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_SECONDS, self._headers_late)

    def _stop_waiting(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _unread_body(self) -> bool:
        """The answer went out whole while the request's body still arrives: uvicorn drops what comes of it."""
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._unread_body():  # its answer was sent: nothing to say
            self.transport.close()
            return
        if self.conn.their_state is not h11.IDLE:
            return
        received, _ = self.conn.trailing_data  # what came of the request, not parsed yet
        if received:  # a client that sends nothing (a port probe, an idle pooled socket) gets no answer
            self.transport.write(_timeout_response())
        self.transport.close()
