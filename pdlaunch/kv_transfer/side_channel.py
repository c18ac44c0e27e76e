"""The handshake side channel: a small threaded TCP server with length-prefixed JSON messages.

Frame: 4-byte big-endian length, then that many bytes of UTF-8 JSON (an object with a "type").
Every request gets exactly one answer frame: {"ok": true, ...} or {"ok": false, "error": "..."}.
The prefill instance serves it (handshake and push requests); decode connects per call.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import struct
import threading
import time
from typing import Any, Callable

from pdlaunch.errors import KVTransferError

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES = 64 << 20  # agent metadata is KiBs; anything this big is not our protocol
_HEADER = struct.Struct(">I")

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def send_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None when the peer closed the connection cleanly."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"side-channel frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    body = _recv_exact(sock, length)
    if body is None:
        raise ConnectionError("side-channel peer closed the connection mid-frame")
    return json.loads(body)


class _RequestHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: SideChannelServer = self.server  # type: ignore[assignment]
        self.request.settimeout(server.io_timeout)
        while True:
            try:
                message = recv_frame(self.request)
            except (OSError, ValueError) as e:
                logger.debug("side channel: dropping connection from %s: %s", self.client_address, e)
                return
            if message is None:
                return
            send_frame(self.request, server.dispatch(message))


class SideChannelServer(socketserver.ThreadingTCPServer):
    """Serves `handlers[message["type"]](message)` on host:port (port 0 = a free port)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, handlers: dict[str, Handler], io_timeout: float = 30.0) -> None:
        self.handlers = handlers
        self.io_timeout = io_timeout
        try:
            super().__init__((host, port), _RequestHandler)
        except OSError as e:
            raise KVTransferError(
                f"cannot bind the KV side channel to {host}:{port}: {e.strerror or e}",
                field="kv_transfer.side_channel_port",
                hint=f"port {port} is taken or {host} is not an address of this host; choose another "
                "kv_transfer.side_channel_port / side_channel_host, or leave the port unset for a free one",
            ) from e
        self._thread = threading.Thread(target=self.serve_forever, name=f"kv-side-channel-{self.port}", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def dispatch(self, message: dict[str, Any]) -> dict[str, Any]:
        handler = self.handlers.get(str(message.get("type")))
        if handler is None:
            return {"ok": False, "error": f"unknown side-channel message type {message.get('type')!r}"}
        try:
            return {"ok": True, **handler(message)}
        except KVTransferError as e:
            return {"ok": False, "error": e.render()}
        except Exception as e:  # a bug on this side must not kill the server thread; the peer gets the text
            logger.exception("side-channel handler %s failed", message.get("type"))
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5.0)


def call(host: str, port: int, message: dict[str, Any], timeout: float, what: str) -> dict[str, Any]:
    """One request/answer with the side channel at host:port within `timeout` seconds.

    Connection refused is retried (the peer may still be starting) until the deadline. Raises
    KVTransferError saying `what` was being waited for; an {"ok": false} answer raises too.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=remaining) as sock:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                send_frame(sock, message)
                answer = recv_frame(sock)
            if answer is None:
                raise ConnectionError("peer closed the connection without answering")
            if not answer.get("ok"):
                raise KVTransferError(f"{what}: the peer at {host}:{port} answered: {answer.get('error')}")
            return answer
        except (ConnectionRefusedError, ConnectionResetError) as e:
            last_error = e
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
        except (OSError, ValueError) as e:  # socket.timeout is an OSError
            last_error = e
            break
    raise KVTransferError(
        f"{what}: no answer from the side channel at {host}:{port} within {timeout:g}s ({last_error})",
        field="kv_transfer.handshake_timeout_seconds",
        hint="is the prefill instance running, and is its kv_transfer.side_channel_host reachable from here?",
    )
