"""The KV side channel's server: the prefill instance answers authenticated requests (frames.py) with the
handler their "type" names, each validated against the typed messages first.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.auth import JSONObject, RateLimitedWarning, SideChannelKeys, mac_ok
from pdlaunch.kv_transfer.messages import Envelope, SideChannelRequest
from pdlaunch.kv_transfer.side_channel.frames import FRAME_READ_SECONDS, FrameError, pack, readable, recv_raw_frame

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 64  # decode ranks keep up to 4 open each (Connections: one per loader thread)
REPLAY_WINDOW_SECONDS = 30.0  # a request's ts must lie this close to our clock (multi-node skew included)

Handler = Callable[[Any], BaseModel]  # takes the messages.py model its "type" names


class _RequestHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: SideChannelServer = self.server  # type: ignore[assignment]
        peer = "{}:{}".format(*self.client_address[:2])
        served = False
        while True:
            if served and not readable(self.request, FRAME_READ_SECONDS):
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
