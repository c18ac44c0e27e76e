"""The proxy's requests to instances sent in one piece: a request's head and body in one send.

httpcore writes a request's head, then its body: two sends, and an instance that wakes for the head (parses it and
starts the request's task, which then waits for the body) and again for the body. Each wakeup of an instance's event
loop may wait up to the GIL's switch interval for its engine thread's turn (config/gil_switch.py), and on a busy
2-core machine a prefill woke 2.3 ms before its body came. The streams of `HeldWritesBackend` hold a request's
writes until the first read of its answer, or until HELD_BYTES are held, and send them together.

A send that fails when held writes go out at a read is dropped there and the read goes on, as httpcore drops a
failed send of a request to read the answer an instance may have sent before closing: a request to an instance that
closed the connection fails as it did (its read finds the connection gone).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable

import httpcore
import httpx

HELD_BYTES = 64 << 10  # a larger body goes out as it is written, in sends of at least this much


class HeldWritesStream(httpcore.AsyncNetworkStream):
    """`stream`, whose writes wait for the next read (or HELD_BYTES) and go out as one."""

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._timeout: float | None = None  # the last held write's: the send's own

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._held.append(buffer)
        self._held_bytes += len(buffer)
        self._timeout = timeout
        if self._held_bytes >= HELD_BYTES:
            await self._send_held()

    async def _send_held(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held, self._held_bytes = [], 0
            await self._stream.write(data, self._timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            await self._send_held()
        except httpcore.WriteError:
            pass  # as httpcore's own: the instance may have answered before it closed; the read says
        return await self._stream.read(max_bytes, timeout)

    async def aclose(self) -> None:
        self._held, self._held_bytes = [], 0
        await self._stream.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        await self._send_held()
        return HeldWritesStream(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> object:
        return self._stream.get_extra_info(info)


class HeldWritesBackend(httpcore.AsyncNetworkBackend):
    """httpcore's asyncio backend, whose streams are HeldWritesStreams."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        return HeldWritesStream(await self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        return HeldWritesStream(await self._backend.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def held_writes_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """httpx's transport with `limits` (HTTP/1.1, as the proxy reaches instances), on HeldWritesBackend."""
    # One SSL context for both pools (the CA bundle loads in ~50 ms, per instance and proxy worker at start).
    ssl_context = httpx.create_ssl_context()
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, limits=limits)
    # httpx takes no network backend: its connection pool is replaced by one built as httpx builds it, on ours
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context, max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
        network_backend=HeldWritesBackend())
    return transport
