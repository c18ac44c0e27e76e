"""`--backend ray`: an instance's rank-0 actor that Ray reports temporarily unavailable, given a bounded grace before
it counts as dead.

Ray fails a call with ActorUnavailableError (a RayActorError) when its connection to the actor broke while the GCS
still has the actor alive: a network blip, the actor's node out of touch for a while. The actor may come back, unlike
one Ray reports dead (ActorDiedError). Such a failure of the instance's `serve` call (the launcher's handle on its
end) leaves the instance as it is: it gets no work from the launcher, and the proxy's /health probe decides whether
requests go to it. The actor is asked (`node_address`, in the control group beside `serve`) once per supervision
round, one call at a time. An answer means it is back: its `serve` call is lost (Ray failed it for good), so its end
is watched through `served` (ray_instance.py), a call that returns what `serve` returns. Ray reporting it dead ends
it as any dead actor; no answer within UNREACHABLE_GRACE_S ends it naming its node and how long.

A node killed outright (its raylet gone, the host up) is first reported the same way: the GCS marks the node dead only
once it has missed its health checks, and the grace would keep a dead instance for its whole length. So from the first
failure on, the raylet of the actor's node (its node manager address:port in Ray's node table, recorded when the
instance was launched) is asked for a TCP connection, at most one in flight and one per RAYLET_PROBE_S: one it REFUSES
(the host answered, no process listens: ConnectionRefusedError) means the raylet is gone, and with it every actor of
the node (a raylet is not restarted in place), and ends the instance at once. A connection accepted, one that times out
or a host unreachable keeps the grace: that is a blip, or a node out of touch that may come back. The connect never
blocks the supervision loop: the socket is non-blocking, its outcome read by a poll that does not wait on later rounds,
and one that has not completed within RAYLET_CONNECT_TIMEOUT_S counts as a timeout. A connect that cannot even be
made (no socket of the address's family on this host: an IPv6 node without IPv6 here; out of file descriptors) keeps
the grace too, as a timeout does.

A refusal is trusted only from a raylet that ACCEPTED a connection from this host before: a firewall between the two
that rejects (icmp-port-unreachable, tcp-reset) reads as a refusal too, and would end the instance at every blip. So the
raylet is asked while the instance is healthy (from its launch on, in the supervision rounds, the same non-blocking
connect, at most one in flight) until one connect is accepted: one refused, timed out or unreachable (a blip at launch)
is followed by another RAYLET_RETRY_S after it ended, the wait doubling after each up to RAYLET_RETRY_MAX_S; once
one is accepted a healthy node is not asked again. A refusal ends the instance only if one of those connects, or one
made during the grace, was accepted. A raylet never seen accepting keeps the plain grace (its grace line says so).
"""

from __future__ import annotations

import errno
import re
import select
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pdlaunch.config.addresses import host_port
from pdlaunch.distributed.ray_rank import ray_failure

if TYPE_CHECKING:
    from ray import ObjectRef

# As the head watch's grace (ray_head.LOST_S), and about as long as Ray's GCS takes to declare a node dead that does
# not answer its health checks (5 checks 3 s apart by default): past that, an actor that comes back has most often
# been ended by Ray with its node, and what is left of the instance is not worth waiting for.
UNREACHABLE_GRACE_S = 15.0
RAYLET_CONNECT_TIMEOUT_S = 1.0  # a raylet alive answers a connect within a round trip; past this it is a blip
RAYLET_PROBE_S = 1.0  # a connect to a live raylet at most this often while the grace runs
# while the instance is healthy and its raylet not yet seen accepting: the wait after a connect that was not accepted,
# doubled after each, up to the bound (a firewall that rejects for good costs one connect a minute)
RAYLET_RETRY_S = 2.0
RAYLET_RETRY_MAX_S = 60.0
# Ray's words around the reason: "The actor <hex id> is unavailable: <reason>. The task may or may not have been ..."
_RAY_FRAME = re.compile(r"^The actor \S+ is unavailable: (?P<why>.*?)\.? The task may or may not have been executed "
                        r"on the actor\.?$", re.DOTALL)


RayletAnswer = Literal["accepts", "refuses", "silent"]  # silent: timed out, or the host or network unreachable


class RayletProbe:
    """Whether the raylet at `host`:`port` (a node's node manager, as Ray's node table lists it) accepts a TCP
    connection, asked without blocking (the module's docstring says how); `accepted`: whether one ever did, without
    which a refusal says nothing (a firewall rejecting this host's connects). `check` asks at most once per `every_s`
    (the grace); `check_healthy`, while the instance is healthy, until one is accepted, `retry_s` after one that was
    not, doubling up to `retry_max_s`."""

    def __init__(self, host: str, port: int, timeout_s: float = RAYLET_CONNECT_TIMEOUT_S,
                 every_s: float = RAYLET_PROBE_S, retry_s: float = RAYLET_RETRY_S,
                 retry_max_s: float = RAYLET_RETRY_MAX_S) -> None:
        self.where = host_port(host, port)
        self.timeout_s, self.every_s = timeout_s, every_s
        self.retry_s, self.retry_max_s = retry_s, retry_max_s
        self._retry_at = 0.0  # while healthy: no connect before this (time.monotonic())
        self._retry_wait = retry_s  # while healthy: the wait after the next connect not accepted
        try:  # Ray lists nodes by IP address: numeric, so this asks no resolver
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_NUMERICHOST)[0]
            self._target: tuple[socket.AddressFamily, tuple[object, ...]] | None = (family, address)
        except (socket.gaierror, IndexError):
            self._target = None  # not an address to connect to: the grace alone decides
        self._sock: socket.socket | None = None
        self._started = 0.0
        self._next = 0.0
        self.last: RayletAnswer | None = None  # how the latest connect ended
        self.accepted = False  # a connect from this host was accepted once: a refusal from it is trusted

    def check(self, now: float) -> RayletAnswer | None:
        """Start a connect when none is in flight and one is due (`now`: time.monotonic()); how the one in flight
        ended if it has, None while it has not (or none is due)."""
        if self._sock is None:
            if self._target is None or now < self._next:
                return None
            early = self._start(now)
            if early is not None:
                return self._ended(early)
        assert self._sock is not None
        poller = select.poll()
        poller.register(self._sock, select.POLLOUT)
        if not poller.poll(0):
            if now - self._started < self.timeout_s:
                return None
            return self._ended("silent")
        error = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return self._ended(_answer(error))

    def check_healthy(self, now: float) -> RayletAnswer | None:
        """As `check`, for an instance that is healthy: nothing once a connect was accepted; else the connect in flight
        polled, or one started when the wait after the last one not accepted is over (the module's docstring)."""
        if self.accepted or (self._sock is None and now < self._retry_at):
            return None
        answer = self.check(now)
        if answer is not None and answer != "accepts":
            self._retry_at = now + self._retry_wait
            self._retry_wait = min(2 * self._retry_wait, self.retry_max_s)
        return answer

    def _start(self, now: float) -> RayletAnswer | None:
        """Start a connect; how it ended when it did at once (None: in flight, self._sock)."""
        assert self._target is not None
        family, address = self._target
        self._started, self._next = now, now + self.every_s
        made: socket.socket | None = None
        try:
            made = socket.socket(family, socket.SOCK_STREAM)
            made.setblocking(False)
            error = made.connect_ex(address)
        except OSError:  # no socket of that family here (EAFNOSUPPORT), out of descriptors (EMFILE): a blip
            if made is not None:
                made.close()
            return "silent"
        if error in (errno.EINPROGRESS, errno.EAGAIN):
            self._sock = made
            return None
        made.close()
        return _answer(error)

    def _ended(self, answer: RayletAnswer) -> RayletAnswer:
        self.close()
        self.last = answer
        self.accepted = self.accepted or answer == "accepts"
        return answer

    def close(self) -> None:
        """Drop the connect in flight, if any (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _answer(error: int) -> RayletAnswer:
    """What a connect that ended with `error` (0: connected) says of the raylet."""
    return "accepts" if error == 0 else "refuses" if error == errno.ECONNREFUSED else "silent"


@dataclass
class Unreachable:
    """An instance whose rank-0 actor, on `node`, Ray has reported unavailable since `since` (time.monotonic())."""

    node: str
    since: float
    why: str  # Ray's reason, as unavailable_why says it
    probe: ObjectRef[str] | None = None  # the call asking the actor, while unanswered
    raylet: RayletProbe | None = None  # its node's raylet, asked whether it still accepts connections
    gone: bool = False  # its raylet refused a connection, having accepted one before

    def said(self, name: str) -> str:
        """The line said when the instance's actor is first found unreachable."""
        return (f"{name}: its Ray actor on node {self.node} does not answer (Ray: {self.why}); the instance is kept "
                f"for up to {UNREACHABLE_GRACE_S:.0f}s in case it comes back, asked again each round meanwhile (the "
                f"proxy routes by its /health){self._untrusted()}")

    def _untrusted(self) -> str:
        if self.raylet is None or self.raylet.accepted:
            return ""
        return (f"; its raylet at {self.raylet.where} has not accepted a connection from here, so a refusal from it "
                "is not taken as the node gone")

    def over(self, now: float) -> str | None:
        """How the instance ended once its node's raylet, seen accepting a connection before, refused one, or the grace
        is over; else None."""
        if self.raylet is not None and not self.gone:
            trusted = self.raylet.accepted  # before this connect: a refusal now says the raylet went away
            self.gone = self.raylet.check(now) == "refuses" and trusted
        if self.raylet is not None and self.gone:
            self.gone = True  # said again while the end waits on the head (ray_deployment._head_answers)
            return (f"lost its Ray actor on node {self.node}: its raylet at {self.raylet.where} refuses connections: "
                    f"the node is gone (Ray: {self.why})")
        gone = now - self.since
        if gone < UNREACHABLE_GRACE_S:
            return None
        return f"lost its Ray actor: on node {self.node} it has been unreachable for {gone:.0f}s (Ray: {self.why})"

    def close(self) -> None:
        """Drop the raylet's connect in flight (the instance answered again, or is removed)."""
        if self.raylet is not None:
            self.raylet.close()


def unavailable_why(exc: BaseException) -> str:
    """Ray's reason for an ActorUnavailableError, without its frame (the actor's id, the at-most-once caveat)."""
    text = ray_failure(exc)
    found = _RAY_FRAME.match(text)
    return found.group("why").strip() if found else text
