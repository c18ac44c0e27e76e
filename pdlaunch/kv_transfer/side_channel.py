"""The KV side channel: a small threaded TCP server with authenticated, length-prefixed JSON frames.

Frame: 4-byte big-endian length N (N <= MAX_FRAME_BYTES), then N bytes: a 32-byte HMAC-SHA256 tag
and the JSON body it covers. Request bodies are `messages.Envelope` ({ts, nonce, msg}) tagged with
the request key, answers `messages.Answer` ({ts, re: the request's nonce, answer}) tagged with the
answer key (auth.SideChannelKeys: both derived from the deployment secret). So:
- a peer without the secret gets an error answer and the connection closes: no metadata, no claim,
  no cancel; a frame captured on the wire is refused once its nonce was seen or REPLAY_WINDOW_SECONDS
  passed; a decode accepts only answers tagged by the deployment that answer its own nonce;
- every request is validated against the typed messages before a handler runs.
Bounds: MAX_FRAME_BYTES per frame, MAX_CONNECTIONS handled at once (more are refused), and a frame
must arrive within FRAME_READ_SECONDS of waiting for it (a slow-loris peer holds a thread that long).
The prefill instance serves it (handshake and push requests). A connection serves frames until the
peer closes it or stays idle FRAME_READ_SECONDS after an answer (then it closes quietly): decode's
loads keep connections open for reuse (`Connections`), which saves the TCP connect and the server's
thread start on every push/claim request (~0.4 ms of ~0.45 ms per call on loopback, measured).
"""

from __future__ import annotations

import json
import logging
import secrets
import select
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.auth import MAC_BYTES, JSONObject, RateLimitedWarning, SideChannelKeys, mac, mac_ok
from pdlaunch.kv_transfer.messages import Answer, Envelope, SideChannelRequest

logger = logging.getLogger(__name__)

# The largest frame we send is a push request naming every block of a prompt: at 131072 tokens and
# block size 8 (the smallest), 16384 pairs of ids (~14 bytes each) per group, ~0.5 MB for two groups.
# NIXL agent metadata is ~0.5 KiB on CPU (measured) and KiBs with GPU memory keys. 1 MiB covers both,
# and bounds what MAX_CONNECTIONS peers can make us buffer to 64 MiB.
MAX_FRAME_BYTES = 1 << 20
MAX_CONNECTIONS = 64  # decode ranks keep up to 4 open each (Connections: one per loader thread)
FRAME_READ_SECONDS = 10.0
POOL_IDLE_SECONDS = FRAME_READ_SECONDS / 2  # a kept connection is reused only this long after its last answer
REPLAY_WINDOW_SECONDS = 30.0  # a request's ts must lie this close to our clock (multi-node skew included)
_HEADER = struct.Struct(">I")

Handler = Callable[[Any], BaseModel]  # takes the messages.py model its "type" names
Reply = TypeVar("Reply", bound=BaseModel)


class FrameError(Exception):
    """The peer broke the framing (too large, too slow, closed mid-frame): close the connection."""


def _pack(key: bytes, body: JSONObject) -> bytes:
    data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return _HEADER.pack(MAC_BYTES + len(data)) + mac(key, data) + data


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
    header = _recv_exact(sock, _HEADER.size, deadline, timeout)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES or length < MAC_BYTES:
        raise FrameError(f"frame of {length} bytes (the side channel takes {MAC_BYTES} to {MAX_FRAME_BYTES})")
    data = _recv_exact(sock, length, deadline, timeout)
    if data is None:
        raise FrameError("peer closed the connection mid-frame")
    return data[:MAC_BYTES], data[MAC_BYTES:]


class _RequestHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: SideChannelServer = self.server  # type: ignore[assignment]
        peer = "{}:{}".format(*self.client_address[:2])
        served = False
        while True:
            if served and not _readable(self.request, FRAME_READ_SECONDS):
                return  # a kept connection left idle (or the peer is gone): close it, nothing to refuse
            try:
                frame = recv_raw_frame(self.request, FRAME_READ_SECONDS)
            except ConnectionResetError:  # e.g. a decode that aborted its load closed the claim it no longer reads
                logger.debug("KV side channel: %s reset its connection", peer)
                return
            except (OSError, FrameError) as e:  # socket.timeout is an OSError
                server.refuse(self.request, peer, "frame", str(e))
                return
            if frame is None:
                return
            if not server.serve_frame(self.request, peer, *frame):
                return
            served = True


def _readable(sock: socket.socket, timeout: float) -> bool:
    try:
        return bool(select.select([sock], [], [], timeout)[0])
    except (OSError, ValueError):  # closed under us
        return False


class Connections:
    """Open side-channel connections kept for reuse, per (host, port): at most `per_peer` idle ones,
    each reused only within POOL_IDLE_SECONDS of its last answer (the server closes idle ones after
    FRAME_READ_SECONDS). Thread-safe; a connection is used by one call at a time."""

    def __init__(self, per_peer: int = 4) -> None:
        self.per_peer = per_peer
        self._idle: dict[tuple[str, int], list[tuple[socket.socket, float]]] = {}
        self._lock = threading.Lock()

    def take(self, host: str, port: int) -> socket.socket | None:
        """A kept connection to host:port still fit for a request, or None."""
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get((host, port))
                if not idle:
                    return None
                sock, since = idle.pop()
            # Readable while idle: the peer closed it (or sent what no request asked for): drop it.
            if now - since < POOL_IDLE_SECONDS and not _readable(sock, 0):
                return sock
            sock.close()

    def give(self, host: str, port: int, sock: socket.socket) -> None:
        """Keep `sock` (its last request answered) for the next call to host:port."""
        with self._lock:
            idle = self._idle.setdefault((host, port), [])
            if len(idle) < self.per_peer:
                idle.append((sock, time.monotonic()))
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock, _ in socks:
                sock.close()


class SideChannelServer(socketserver.ThreadingTCPServer):
    """Serves `handlers[msg.type](msg)` (msg: its messages.py model) on host:port (port 0 = a free port) to peers that
    hold the deployment secret."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: connections past MAX_CONNECTIONS are accepted to be refused

    def __init__(self, host: str, port: int, handlers: dict[str, Handler], keys: SideChannelKeys,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.handlers = handlers
        self.keys = keys
        self.max_connections = max_connections
        self._active = 0
        self._open: set[socket.socket] = set()  # connections being served (kept ones included)
        self._seen: dict[str, float] = {}  # request nonce -> when it leaves the replay window (monotonic)
        self._lock = threading.Lock()
        self._warn = RateLimitedWarning(logger)
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

    # -- connections ------------------------------------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
                self._open.add(request)
        if full:
            self.refuse(request, "{}:{}".format(*client_address[:2]), "busy",
                        f"too many side-channel connections (limit {self.max_connections})")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._active -= 1
                self._open.discard(request)

    def num_connections(self) -> int:
        with self._lock:
            return self._active

    def refuse(self, sock: socket.socket, peer: str, kind: str, why: str) -> None:
        """Answer an error to a peer we will not serve (best effort) and log it, rate-limited."""
        self._warn.warn(kind, "KV side channel: refused %s: %s", peer, why)
        self._answer(sock, None, {"ok": False, "error": f"refused: {why}"})

    def _answer(self, sock: socket.socket, nonce: str | None, answer: JSONObject) -> bool:
        try:
            sock.settimeout(FRAME_READ_SECONDS)
            sock.sendall(_pack(self.keys.answer, {"ts": time.time(), "re": nonce, "answer": answer}))
            return True
        except OSError:
            return False

    # -- frames -----------------------------------------------------------------------------------
    def serve_frame(self, sock: socket.socket, peer: str, tag: bytes, body: bytes) -> bool:
        """Answer one frame; False: close the connection (the peer is not authenticated)."""
        if not mac_ok(self.keys.request, body, tag):
            self.refuse(sock, peer, "auth", "the frame is not authenticated with this deployment's secret")
            return False
        try:
            envelope = Envelope.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            error = f"invalid side-channel message: {where}: {first['msg']}"
            return self._answer(sock, None, {"ok": False, "error": error})
        fresh = self._fresh(envelope)
        if fresh is not None:
            self.refuse(sock, peer, "replay", fresh)
            return False
        return self._answer(sock, envelope.nonce, self.dispatch(envelope.msg))

    def _fresh(self, envelope: Envelope) -> str | None:
        """None when the request is new: its ts is within the window and its nonce unseen; else why not."""
        skew = envelope.ts - time.time()
        if abs(skew) > REPLAY_WINDOW_SECONDS:
            return f"the frame is {abs(skew):.0f}s {'ahead of' if skew > 0 else 'behind'} this host's clock " \
                f"(window {REPLAY_WINDOW_SECONDS:g}s)"
        now = time.monotonic()
        with self._lock:
            if envelope.nonce in self._seen:
                return "the frame was seen before (a replay)"
            if len(self._seen) > 4096:  # prune what left the window (each nonce is kept ~2 windows at most)
                self._seen = {n: t for n, t in self._seen.items() if t > now}
            self._seen[envelope.nonce] = now + 2 * REPLAY_WINDOW_SECONDS
        return None

    def dispatch(self, message: SideChannelRequest) -> JSONObject:
        handler = self.handlers.get(message.type)
        if handler is None:
            return {"ok": False, "error": f"side-channel message type {message.type!r} is not served here"}
        try:
            return {"ok": True, **handler(message).model_dump(mode="json")}
        except KVTransferError as e:
            return {"ok": False, "error": e.render()}
        except Exception as e:  # a bug on this side must not kill the server thread; the peer gets the text
            logger.exception("side-channel handler %s failed", message.type)
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        with self._lock:  # connections a decode keeps open: their threads see EOF and end
            open_connections = list(self._open)
        for sock in open_connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5.0)


def request(host: str, port: int, message: SideChannelRequest, reply: type[Reply], timeout: float, what: str,
            keys: SideChannelKeys, connections: Connections | None = None) -> Reply:
    """`call` with typed ends: `message` is sent, the answer is validated as `reply` (KVTransferError
    naming `what` when it does not fit)."""
    return send(host, port, message, timeout, what, keys, connections).answer(reply)


def send(host: str, port: int, message: SideChannelRequest, timeout: float, what: str, keys: SideChannelKeys,
         connections: Connections | None = None) -> PendingCall:
    """Send `message` now and read its answer later (`PendingCall.answer`): the caller works meanwhile (a
    pull posts its READ while its claim travels)."""
    return PendingCall(host, port, message.model_dump(mode="json"), timeout, what, keys, connections)


def call(host: str, port: int, message: JSONObject, timeout: float, what: str,
         keys: SideChannelKeys, connections: Connections | None = None) -> JSONObject:
    """One authenticated request/answer with the side channel at host:port within `timeout` seconds
    (`message` as a dict: tests also send what no model allows; the KV plane uses `request`).

    Connection refused is retried (the peer may still be starting) until the deadline; with
    `connections`, a kept connection is used when one is open and the connection is kept after an
    authenticated answer; a kept connection the peer closed is replaced at once. Raises
    KVTransferError saying `what` was being waited for; an {"ok": false} answer raises too, and so
    does an answer that is not authenticated or does not answer this request.
    """
    return PendingCall(host, port, message, timeout, what, keys, connections).raw_answer()


class PendingCall:
    """One request (`call`'s rules), sent when made; its answer read by `answer`/`raw_answer`, once. A
    kept connection found closed when the answer is read is replaced and the request sent again (a new
    nonce: the server never answered the first)."""

    def __init__(self, host: str, port: int, message: JSONObject, timeout: float, what: str, keys: SideChannelKeys,
                 connections: Connections | None) -> None:
        self.host, self.port, self.message, self.timeout, self.what = host, port, message, timeout, what
        self.keys, self.connections = keys, connections
        self.deadline = time.monotonic() + timeout
        self.last_error: Exception | None = None
        self._sock: socket.socket | None = None
        self._nonce = ""
        self._reused = False
        self._send()

    def _send(self) -> None:
        """Send on a kept or new connection; a refused connection is retried until the deadline. On
        failure `_sock` stays None and `raw_answer` raises."""
        host, port = self.host, self.port
        while (remaining := self.deadline - time.monotonic()) > 0:
            self._nonce = secrets.token_hex(16)
            frame = _pack(self.keys.request, {"ts": time.time(), "nonce": self._nonce, "msg": self.message})
            if len(frame) - _HEADER.size > MAX_FRAME_BYTES:
                raise KVTransferError(f"{self.what}: the message has {len(frame)} bytes, over the side channel's "
                                      f"{MAX_FRAME_BYTES} (a prompt of too many blocks)",
                                      hint="use a larger cache.block_size or a shorter max_model_len")
            sock = self.connections.take(host, port) if self.connections is not None else None
            self._reused = sock is not None
            try:
                if sock is None:
                    sock = socket.create_connection((host, port), timeout=remaining)
                else:
                    sock.settimeout(remaining)
                sock.sendall(frame)
                self._sock, sock = sock, None
                return
            except (ConnectionRefusedError, ConnectionResetError) as e:
                self.last_error = e
                if not self._reused:  # a kept connection the peer closed: a new one at once, else wait for the peer
                    time.sleep(min(0.05, max(self.deadline - time.monotonic(), 0)))
            except OSError as e:  # socket.timeout is an OSError
                self.last_error = e
                if not (self._reused and isinstance(e, ConnectionError)):
                    return
            finally:
                if sock is not None:
                    sock.close()

    def answer(self, reply: type[Reply]) -> Reply:
        """The answer, validated as `reply` (KVTransferError naming `what` when it does not fit)."""
        answer = self.raw_answer()
        try:
            return reply.model_validate(answer)
        except ValidationError as e:
            raise KVTransferError(f"{self.what}: the answer from {self.host}:{self.port} does not fit: "
                                  f"{e.errors()[0]['msg']}",
                                  hint="run the same pdlaunch version on prefill and decode") from None

    def raw_answer(self) -> JSONObject:
        """The answer as a dict, once it is authenticated and says ok; KVTransferError otherwise."""
        while (sock := self._sock) is not None:
            self._sock = None
            try:
                raw = recv_raw_frame(sock, max(self.deadline - time.monotonic(), 0.001))
                if raw is None:
                    raise ConnectionError("peer closed the connection without answering")
                answer = _open_answer(raw, self.keys, self._nonce, self.host, self.port, self.what)
                if self.connections is not None:  # authenticated and answering this request: fit for the next
                    self.connections.give(self.host, self.port, sock)
                    sock = None
                if not answer.get("ok"):
                    raise KVTransferError(f"{self.what}: the peer at {self.host}:{self.port} answered: "
                                          f"{answer.get('error')}")
                return answer
            except (ConnectionRefusedError, ConnectionResetError) as e:
                self.last_error = e
                if not self._reused:  # the peer may still be starting: again after a pause
                    time.sleep(min(0.05, max(self.deadline - time.monotonic(), 0)))
                self._send()  # (a kept connection the peer had closed: again on a new one at once)
            except (OSError, FrameError) as e:  # socket.timeout is an OSError
                self.last_error = e
                if self._reused and isinstance(e, ConnectionError):
                    self._send()
            finally:
                if sock is not None:
                    sock.close()
        raise KVTransferError(
            f"{self.what}: no answer from the side channel at {self.host}:{self.port} within {self.timeout:g}s "
            f"({self.last_error})",
            field="kv_transfer.handshake_timeout_seconds",
            hint="is the prefill instance running, and is its kv_transfer.side_channel_host reachable from here?",
        )

    def close(self) -> None:
        """Give up the answer (the connection is closed, not kept: an answer may still arrive on it)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _open_answer(raw: tuple[bytes, bytes], keys: SideChannelKeys, nonce: str, host: str, port: int,
                 what: str) -> JSONObject:
    tag, body = raw
    try:
        answer = Answer.model_validate_json(body) if mac_ok(keys.answer, body, tag) else None
    except ValidationError:
        answer = None
    if answer is not None and answer.re is None and not answer.answer.get("ok"):
        # Refused before our request was authenticated (e.g. busy): its error is the useful part.
        raise KVTransferError(f"{what}: the peer at {host}:{port} answered: {answer.answer.get('error')}")
    if answer is None or answer.re != nonce:
        raise KVTransferError(
            f"{what}: the answer from {host}:{port} is not authenticated for this request",
            field="security.deployment_secret",
            hint="every instance of a deployment must have the same deployment secret; is something else "
            "listening on that port?")
    return answer.answer
