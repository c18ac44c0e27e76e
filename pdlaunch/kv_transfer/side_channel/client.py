"""The KV side channel's client: one authenticated request and its answer (frames.py), on a connection
kept for reuse (`Connections`) or a new one.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.auth import JSONObject, SideChannelKeys, mac_ok
from pdlaunch.kv_transfer.messages import Answer, SideChannelRequest
from pdlaunch.kv_transfer.side_channel.frames import (
    BUSY,
    FRAME_READ_SECONDS,
    HEADER,
    MAX_FRAME_BYTES,
    FrameError,
    pack,
    readable,
    recv_raw_frame,
)

POOL_IDLE_SECONDS = FRAME_READ_SECONDS / 2  # a kept connection is reused only this long after its last answer
# A call that may be given up (`stopped`) looks whether it should every this many seconds while it waits for its
# answer: one select() on one socket per look, so a load aborted mid-handshake frees its thread within it.
STOP_POLL_SECONDS = 0.1
# A server refusing busy (all its connections serving, or its replay table full) is asked again after a pause that
# doubles from the first to the last (its idle kept connections give way to new ones, so room comes back quickly).
BUSY_PAUSE_SECONDS = (0.01, 0.5)

Reply = TypeVar("Reply", bound=BaseModel)


class _Busy(Exception):
    """The server refused the connection for want of room (its error text): ask again until the deadline."""


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
            if now - since < POOL_IDLE_SECONDS and not readable(sock, 0):
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


def request(host: str, port: int, message: SideChannelRequest, reply: type[Reply], timeout: float, what: str,
            keys: SideChannelKeys, connections: Connections | None = None,
            stopped: Callable[[], bool] | None = None) -> Reply:
    """`call` with typed ends: `message` is sent, the answer is validated as `reply` (KVTransferError
    naming `what` when it does not fit). `stopped`: see PendingCall."""
    return send(host, port, message, timeout, what, keys, connections, stopped).answer(reply)


def send(host: str, port: int, message: SideChannelRequest, timeout: float, what: str, keys: SideChannelKeys,
         connections: Connections | None = None, stopped: Callable[[], bool] | None = None) -> PendingCall:
    """Send `message` now and read its answer later (`PendingCall.answer`): the caller works meanwhile (a
    pull posts its READ while its claim travels)."""
    return PendingCall(host, port, message.model_dump(mode="json"), timeout, what, keys, connections, stopped)


def call(host: str, port: int, message: JSONObject, timeout: float, what: str,
         keys: SideChannelKeys, connections: Connections | None = None) -> JSONObject:
    """One authenticated request/answer with the side channel at host:port within `timeout` seconds
    (`message` as a dict: tests also send what no model allows; the KV plane uses `request`).

    Connection refused and a busy refusal (the server's connections are all serving) are retried until the
    deadline (the peer may still be starting; the busy pause backs off); with
    `connections`, a kept connection is used when one is open and the connection is kept after an
    authenticated answer; a kept connection the peer closed is replaced at once. Raises
    KVTransferError saying `what` was being waited for; an {"ok": false} answer raises too, and so
    does an answer that is not authenticated or does not answer this request.
    """
    return PendingCall(host, port, message, timeout, what, keys, connections).raw_answer()


class PendingCall:
    """One request (`call`'s rules), sent when made; its answer read by `answer`/`raw_answer`, once. A
    kept connection found closed when the answer is read is replaced and the request sent again (a new
    nonce: the server never answered the first).

    `stopped` (optional): asked every STOP_POLL_SECONDS while the call waits for its answer, or for a refused
    peer to listen; once it says True the call gives up at once (KVTransferError, the connection closed, not
    kept). A connect that neither succeeds nor is refused (a peer whose packets are dropped) still waits out
    the call's timeout: the socket module's connect cannot be polled without a non-blocking connect of our own."""

    def __init__(self, host: str, port: int, message: JSONObject, timeout: float, what: str, keys: SideChannelKeys,
                 connections: Connections | None, stopped: Callable[[], bool] | None = None) -> None:
        self.host, self.port, self.message, self.timeout, self.what = host, port, message, timeout, what
        self.keys, self.connections, self.stopped = keys, connections, stopped
        self.deadline = time.monotonic() + timeout
        self.last_error: Exception | None = None
        self._busy_since: float | None = None  # when the server first refused busy (monotonic)
        self._busy_pause = BUSY_PAUSE_SECONDS[0]
        self._sock: socket.socket | None = None
        self._nonce = ""
        self._reused = False
        self._send()

    def _send(self) -> None:
        """Send on a kept or new connection; a refused connection is retried until the deadline. On
        failure `_sock` stays None and `raw_answer` raises."""
        host, port = self.host, self.port
        while (remaining := self.deadline - time.monotonic()) > 0:
            self._check_stopped()
            self._nonce = secrets.token_hex(16)
            frame = pack(self.keys.request, {"ts": time.time(), "nonce": self._nonce, "msg": self.message})
            if len(frame) - HEADER.size > MAX_FRAME_BYTES:
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
            except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError) as e:
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
                self._await_answer(sock)
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
            except _Busy as e:
                self.last_error = e
                self._wait_for_room()
                self._send()
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
        if isinstance(self.last_error, _Busy) and self._busy_since is not None:
            raise KVTransferError(
                f"{self.what}: the prefill's side channel at {self.host}:{self.port} was full for "
                f"{time.monotonic() - self._busy_since:.1f}s of the {self.timeout:g}s allowed "
                f"(it answered: {self.last_error})",
                field="kv_transfer.handshake_timeout_seconds",
                hint="the prefill serves too many side-channel requests at once: give the prefill more instances "
                "(or TP ranks), send it fewer decodes, or raise kv_transfer.handshake_timeout_seconds")
        raise KVTransferError(
            f"{self.what}: no answer from the side channel at {self.host}:{self.port} within {self.timeout:g}s "
            f"({self.last_error})",
            field="kv_transfer.handshake_timeout_seconds",
            hint="is the prefill instance running, and is its kv_transfer.side_channel_host reachable from here?",
        )

    def _wait_for_room(self) -> None:
        """Pause before asking a busy server again (doubling pauses, within the deadline; `stopped` looked at)."""
        now = time.monotonic()
        if self._busy_since is None:
            self._busy_since = now
        until = min(now + self._busy_pause, self.deadline)
        self._busy_pause = min(self._busy_pause * 2, BUSY_PAUSE_SECONDS[1])
        while (left := until - time.monotonic()) > 0:
            self._check_stopped()
            time.sleep(min(left, STOP_POLL_SECONDS))

    def _check_stopped(self) -> None:
        if self.stopped is not None and self.stopped():
            raise KVTransferError(f"{self.what}: given up before {self.host}:{self.port} answered (its caller "
                                  "stopped waiting)")

    def _await_answer(self, sock: socket.socket) -> None:
        """With `stopped`: wait until the answer starts to arrive (or the deadline passed) in looks of at most
        STOP_POLL_SECONDS, giving up once `stopped` says so; the frame is then read within the deadline."""
        if self.stopped is None:
            return
        while not readable(sock, min(STOP_POLL_SECONDS, max(self.deadline - time.monotonic(), 0.0))):
            self._check_stopped()
            if time.monotonic() >= self.deadline:
                return

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
        error = str(answer.answer.get("error"))
        if error.startswith(f"refused: {BUSY}"):
            raise _Busy(error)
        raise KVTransferError(f"{what}: the peer at {host}:{port} answered: {answer.answer.get('error')}")
    if answer is None or answer.re != nonce:
        raise KVTransferError(
            f"{what}: the answer from {host}:{port} is not authenticated for this request",
            field="security.deployment_secret",
            hint="every instance of a deployment must have the same deployment secret; is something else "
            "listening on that port?")
    return answer.answer
