"""Raw side-channel clients for the attack and fuzz tests: frames built by hand, any tag or length."""

from __future__ import annotations

import json
import socket
import struct
import time
import uuid
from typing import Any

from pdlaunch.kv_transfer.auth import SideChannelKeys, mac

HEADER = struct.Struct(">I")


def frame(body: bytes, tag: bytes) -> bytes:
    return HEADER.pack(len(tag) + len(body)) + tag + body


def envelope(message: Any, ts: float | None = None, nonce: str | None = None) -> bytes:
    return json.dumps({"ts": time.time() if ts is None else ts, "nonce": nonce or uuid.uuid4().hex,
                       "msg": message}).encode()


def authed(keys: SideChannelKeys, message: Any, **kw: Any) -> bytes:
    body = envelope(message, **kw)
    return frame(body, mac(keys.request, body))


def exchange(port: int, data: bytes, timeout: float = 15.0) -> dict[str, Any] | None:
    """Send raw bytes, return the answer body's JSON (tag not checked), None when the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> dict[str, Any] | None:
    header = _read(sock, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    data = _read(sock, length)
    return None if data is None else json.loads(data[32:])


def _read(sock: socket.socket, n: int) -> bytes | None:
    out = b""
    while len(out) < n:
        try:
            chunk = sock.recv(n - len(out))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        out += chunk
    return out
