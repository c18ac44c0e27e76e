"""A response's head sent together with the start of its body: one send, so its reader wakes once.

uvicorn's h11 protocol writes a response's status line and headers to the socket when the app sends
`http.response.start`, and its body when the app sends that: two sends for a whole JSON answer, and a reader that
wakes for the head, then sleeps again until the body comes. The proxy reads every prefill leg's answer so; on a busy
2-core machine the prefill's two sends were milliseconds apart when the proxy ran in between. `HeldHeadTransport`
holds a write that starts a response until the next write, which it joins, or until the event loop's current
iteration ends (a stream's head, whose first event comes later): a whole answer goes out in one send, and a head
alone leaves no later than the callbacks already due in that iteration have run. Every other write goes out at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

RESPONSE_START = b"HTTP/1.1 "  # how h11 begins a response's head (and an interim 100 Continue)


class HeldHeadTransport(asyncio.Transport):
    """`transport`, holding a response's head (a write that begins with RESPONSE_START) for the next write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            data, self._held = self._held + bytes(data), None
        elif bytes(data[:len(RESPONSE_START)]) == RESPONSE_START:
            self._held = bytes(data)
            self._loop.call_soon(self._send_held)
            return
        self._transport.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def _send_held(self) -> None:
        """The end of the loop iteration that held a head: it goes out alone (no write joined it)."""
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():  # the connection went meanwhile: nobody reads it
                self._transport.write(held)

    def close(self) -> None:
        self._send_held()  # a head written just before (an error answer, then the connection closed) goes first
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def write_eof(self) -> None:
        self._send_held()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()
