"""The KV side channel's frames: authenticated, length-prefixed JSON over TCP, and their bounds.

Frame: 4-byte big-endian length N (N <= MAX_FRAME_BYTES), then N bytes: a 32-byte HMAC-SHA256 tag
and the JSON body it covers. Request bodies are `messages.Envelope` ({ts, nonce, msg}) tagged with
the request key, answers `messages.Answer` ({ts, re: the request's nonce, answer}) tagged with the
answer key (auth.SideChannelKeys: both derived from the deployment secret). So:
- a peer without the secret gets an error answer and the connection closes: no metadata, no claim,
  no cancel; a frame captured on the wire is refused once its nonce was seen or
  server.REPLAY_WINDOW_SECONDS passed; a decode accepts only answers tagged by the deployment that
  answer its own nonce;
- every request is validated against the typed messages before a handler runs.
Bounds: MAX_FRAME_BYTES per frame, server.MAX_CONNECTIONS handled at once (the longest idle kept one is
closed for a new one; past that a new one is refused BUSY, and the client asks again until its deadline),
server.MAX_NONCES requests remembered within their replay lifetime (more are refused BUSY), and a
frame must arrive within FRAME_READ_SECONDS of waiting for it (a slow-loris peer holds a thread that
long). The prefill instance serves it (handshake and push requests: server.py). A connection serves
frames until the peer closes it or stays idle FRAME_READ_SECONDS after an answer (then it closes
quietly): decode's loads keep connections open for reuse (`client.Connections`), which saves the TCP
connect and the server's thread start on every push/claim request (~0.4 ms of ~0.45 ms per call on
loopback, measured).
"""

from __future__ import annotations

import json
import select
import socket
import struct
import time

from pdlaunch.kv_transfer.auth import MAC_BYTES, JSONObject, mac

# The largest frame we send is a push request naming every block of a prompt: at 131072 tokens and
# block size 8 (the smallest), 16384 pairs of ids (~14 bytes each) per group, ~0.5 MB for two groups.
# NIXL agent metadata is ~0.5 KiB on CPU (measured) and KiBs with GPU memory keys. 1 MiB covers both,
# and bounds what MAX_CONNECTIONS peers can make us buffer to 64 MiB.
MAX_FRAME_BYTES = 1 << 20
FRAME_READ_SECONDS = 10.0
# How a server's refusal for want of room (connections, replay table) starts: the client retries it until its deadline.
BUSY = "busy"
HEADER = struct.Struct(">I")


class FrameError(Exception):
    """The peer broke the framing (too large, too slow, closed mid-frame): close the connection."""


def pack(key: bytes, body: JSONObject) -> bytes:
    data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return HEADER.pack(MAC_BYTES + len(data)) + mac(key, data) + data


def _recv_exact(sock: socket.socket, n: int, deadline: float, timeout: float) -> bytes | None:
    chunks: list[bytes] = []
    while n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FrameError(f"frame not received within {timeout:g}s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(n, 1 << 16))
        except TimeoutError:  # socket.timeout
            raise FrameError(f"frame not received within {timeout:g}s") from None
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_raw_frame(sock: socket.socket, timeout: float) -> tuple[bytes, bytes] | None:
    """(tag, body) of the next frame, None when the peer closed cleanly between frames."""
    deadline = time.monotonic() + timeout
    header = _recv_exact(sock, HEADER.size, deadline, timeout)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME_BYTES or length < MAC_BYTES:
        raise FrameError(f"frame of {length} bytes (the side channel takes {MAC_BYTES} to {MAX_FRAME_BYTES})")
    data = _recv_exact(sock, length, deadline, timeout)
    if data is None:
        raise FrameError("peer closed the connection mid-frame")
    return data[:MAC_BYTES], data[MAC_BYTES:]


def readable(sock: socket.socket, timeout: float) -> bool:
    try:
        return bool(select.select([sock], [], [], timeout)[0])
    except (OSError, ValueError):  # closed under us
        return False
