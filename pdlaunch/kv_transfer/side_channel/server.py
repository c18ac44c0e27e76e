"""The KV side channel's server: the prefill instance answers authenticated requests (frames.py) with the
handler their "type" names, each validated against the typed messages first.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.auth import JSONObject, RateLimitedWarning, SideChannelKeys, mac_ok
from pdlaunch.kv_transfer.messages import Envelope, SideChannelRequest
from pdlaunch.kv_transfer.side_channel.frames import (
    BUSY,
    FRAME_READ_SECONDS,
    FrameError,
    pack,
    readable,
    recv_raw_frame,
)

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 64  # decode ranks keep up to 4 open each (Connections: one per loader thread)
REPLAY_WINDOW_SECONDS = 30.0  # a request's ts must lie this close to our clock (multi-node skew included)
NONCE_LIFETIME_SECONDS = 2 * REPLAY_WINDOW_SECONDS  # a frame's ts may be a window ahead: it stays fresh 2 windows
# Nonces of the last NONCE_LIFETIME_SECONDS remembered at most (~200 B each, ~50 MiB): a sustained ~4400 requests/s
# per prefill rank; past it requests are refused busy until the oldest expire (the client retries busy).
MAX_NONCES = 1 << 18

Handler = Callable[[Any], BaseModel]  # takes the messages.py model its "type" names


class NonceTable:
    """The request nonces seen within their lifetime, in the order they expire (every nonce lives
    NONCE_LIFETIME_SECONDS, so that is the order they came): a check drops only the expired oldest ones, so its
    cost does not grow with the request rate. Not thread-safe (the server holds its lock)."""

    def __init__(self, max_nonces: int = MAX_NONCES) -> None:
        self.max_nonces = max_nonces
        self._expiry: deque[tuple[float, str]] = deque()  # (monotonic expiry, nonce), oldest first
        self._live: set[str] = set()
        self.pruned = 0  # nonces dropped once expired, in all

    def __len__(self) -> int:
        return len(self._live)

    def admit(self, nonce: str, now: float) -> str | None:
        """None: `nonce` is new and is remembered until now + NONCE_LIFETIME_SECONDS; else why it is refused."""
        while self._expiry and self._expiry[0][0] <= now:
            self._live.discard(self._expiry.popleft()[1])
            self.pruned += 1
        if nonce in self._live:
            return "the frame was seen before (a replay)"
        if len(self._live) >= self.max_nonces:
            return f"{BUSY}: {len(self._live)} requests within the last {NONCE_LIFETIME_SECONDS:g}s, the most " \
                "this side channel remembers to refuse replays"
        self._expiry.append((now + NONCE_LIFETIME_SECONDS, nonce))
        self._live.add(nonce)
        return None


class _RequestHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: SideChannelServer = self.server  # type: ignore[assignment]
        peer = "{}:{}".format(*self.client_address[:2])
        served = False
        while True:
            if served:  # a kept connection: idle (the server may close it for a new one) until a frame comes
                server.set_idle(self.request, True)
                if not readable(self.request, FRAME_READ_SECONDS):
                    return  # left idle (or the peer is gone): close it, nothing to refuse
                if not server.set_idle(self.request, False):
                    return  # closed for a new connection: the peer sends again on another (client.PendingCall)
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
        self._open: set[socket.socket] = set()  # connections being served (kept ones included)
        self._idle: dict[socket.socket, float] = {}  # kept connections waiting for a request -> since (monotonic)
        self._seen = NonceTable()
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
        """Serve the new connection; at the limit, in the place of the kept connection idle the longest (never one
        serving a request), else refuse it busy."""
        evicted = None
        with self._lock:
            if len(self._open) >= self.max_connections and self._idle:
                evicted = min(self._idle, key=self._idle.__getitem__)
                del self._idle[evicted]
                self._open.discard(evicted)  # its thread sees the shutdown below and ends
            full = len(self._open) >= self.max_connections
            if not full:
                self._open.add(request)
        if evicted is not None:
            try:
                evicted.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if full:
            self.refuse(request, "{}:{}".format(*client_address[:2]), "busy",
                        f"{BUSY}: too many side-channel connections serving requests (limit {self.max_connections})")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open.discard(request)
                self._idle.pop(request, None)

    def set_idle(self, sock: socket.socket, idle: bool) -> bool:
        """Mark a kept connection idle (waiting for its next request) or busy again; False: it was closed for a
        new connection meanwhile (do not serve it)."""
        with self._lock:
            if sock not in self._open:
                return False
            if idle:
                self._idle[sock] = time.monotonic()
            else:
                self._idle.pop(sock, None)
            return True

    def num_connections(self) -> int:
        """Connections being served or kept idle (the limit counts both, idle ones give way to new ones)."""
        with self._lock:
            return len(self._open)

    def refuse(self, sock: socket.socket, peer: str, kind: str, why: str) -> None:
        """Answer an error to a peer we will not serve (best effort) and log it, rate-limited."""
        self._warn.warn(kind, "KV side channel: refused %s: %s", peer, why)
        self._answer(sock, None, {"ok": False, "error": f"refused: {why}"})

    def _answer(self, sock: socket.socket, nonce: str | None, answer: JSONObject) -> bool:
        try:
            sock.settimeout(FRAME_READ_SECONDS)
            sock.sendall(pack(self.keys.answer, {"ts": time.time(), "re": nonce, "answer": answer}))
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
            self.refuse(sock, peer, "busy" if fresh.startswith(BUSY) else "replay", fresh)
            return False
        return self._answer(sock, envelope.nonce, self.dispatch(envelope.msg))

    def _fresh(self, envelope: Envelope) -> str | None:
        """None when the request is new: its ts is within the window and its nonce unseen; else why not."""
        skew = envelope.ts - time.time()
        if abs(skew) > REPLAY_WINDOW_SECONDS:
            return f"the frame is {abs(skew):.0f}s {'ahead of' if skew > 0 else 'behind'} this host's clock " \
                f"(window {REPLAY_WINDOW_SECONDS:g}s)"
        with self._lock:
            return self._seen.admit(envelope.nonce, time.monotonic())

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
