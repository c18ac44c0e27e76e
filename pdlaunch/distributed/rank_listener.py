"""Rank 0's side of the links to ranks on other nodes (remote_link.py is the remote rank's): a listener on its
node's address, published in the group's rendezvous store, that accepts each awaited rank once it passed the
key exchange and named itself (Hello), every handshake within a bounded wait.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

import torch.distributed as dist

from pdlaunch.distributed.join_waits import RENDEZVOUS_SETTING
from pdlaunch.distributed.link_socket import keep_alive
from pdlaunch.distributed.message_stream import UnexpectedMessage, recv_as
from pdlaunch.distributed.messages import Hello
from pdlaunch.errors import EngineError

log = logging.getLogger(__name__)

LISTENER_KEY = "pdlaunch/remote_rank_listener"  # store key: "host:port" of rank 0's listener
HELLO_TIMEOUT_S = 10.0  # a connected peer passes the key exchange and names its rank within this


class RankListener:
    """Rank 0's side: accepts the remote ranks of its group, each within a bounded wait."""

    def __init__(self, host: str, authkey: bytes) -> None:
        self.authkey = authkey
        self._sock = socket.create_server((host, 0))
        self.address = f"{host}:{self._sock.getsockname()[1]}"

    def publish(self, store: dist.Store) -> None:
        store.set(LISTENER_KEY, self.address)

    def accept(self, expected: dict[int, str], timeout_s: float) -> dict[int, Connection]:
        """Connections of every rank in `expected` (rank -> "node K (address)") within `timeout_s` in all (each
        handshake gets HELLO_TIMEOUT_S at most, and no more than what is left), or EngineError naming the ranks
        that never came and the peers refused meanwhile."""
        conns: dict[int, Connection] = {}
        refused: list[str] = []
        deadline = time.monotonic() + timeout_s
        while len(conns) < len(expected):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for conn in conns.values():
                    conn.close()
                raise self._missing(expected, conns, refused, timeout_s)
            self._sock.settimeout(remaining)
            try:
                raw, peer = self._sock.accept()
            except TimeoutError:
                continue
            where = f"a peer at {peer[0]}:{peer[1]}"
            hello = self._handshake(raw, where, min(remaining, HELLO_TIMEOUT_S))
            if isinstance(hello, str):
                log.warning("refused a connection from %s:%d: %s", peer[0], peer[1], hello)
                refused.append(f"{where} ({hello})")
                continue
            rank, conn = hello
            if rank not in expected or rank in conns:
                log.warning("%s claimed TP rank %d, which is not awaited here: ignored", where, rank)
                refused.append(f"{where} (it claimed TP rank {rank}, not awaited)")
                conn.close()
                continue
            conns[rank] = conn
            log.info("TP rank %d connected from %s:%d", rank, peer[0], peer[1])
        return conns

    def _missing(self, expected: dict[int, str], conns: dict[int, Connection], refused: list[str],
                 timeout_s: float) -> EngineError:
        missing = ", ".join(f"TP rank {r} on {where}" for r, where in expected.items() if r not in conns)
        meanwhile = f"; refused meanwhile: {'; '.join(refused[-3:])}" if refused else ""
        return EngineError(f"{missing} did not connect to rank 0 at {self.address} within {timeout_s:g}s "
                           f"({RENDEZVOUS_SETTING}){meanwhile}", field="parallel.nodes",
                           hint="run `pdlaunch serve CONFIG --node-rank K` on that node with the same "
                           "config (and PDLAUNCH_TP_SECRET; under Kubernetes, see that worker pod), and check it "
                           "reaches this address; one that starts late (an image pull, a pod waiting to be "
                           f"scheduled) needs a larger {RENDEZVOUS_SETTING}")

    def _handshake(self, raw: socket.socket, peer: str, seconds: float) -> tuple[int, Connection] | str:
        """(rank, link) of the peer on `raw` once it passed the key exchange and named its rank, all within
        `seconds`; else why it was refused."""
        raw.setblocking(True)  # Connection reads a blocking fd; the cutoff ends a read still blocked at the bound
        conn = Connection(raw.detach())
        cutoff = _Cutoff(conn, seconds)
        try:
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
            if not conn.poll(seconds):
                raise TimeoutError(f"it did not finish its handshake within {seconds:.1f}s (no Hello)")
            hello = recv_as(conn, peer, Hello)
        except (AuthenticationError, OSError, EOFError, UnexpectedMessage) as exc:
            cut = cutoff.end()
            conn.close()
            return f"it did not finish its handshake within {seconds:.1f}s" if cut else str(exc) or type(exc).__name__
        if cutoff.end():
            conn.close()
            return f"it did not finish its handshake within {seconds:.1f}s"
        probe = socket.socket(fileno=conn.fileno())
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))  # steps may idle long
        # No bound on unacknowledged sends here: rank 0 bounds its own (tp_startup.SEND_TIMEOUT_S, longer than
        # LINK_DEAD_AFTER_S), and TCP_USER_TIMEOUT would also cut a live rank whose receive window stays full.
        keep_alive(probe, unacked_s=None)
        probe.detach()
        return hello.rank, conn

    def close(self) -> None:
        self._sock.close()


class _Cutoff:
    """Shuts the socket under `conn` down once `seconds` have passed, unless ended first: a read blocked on it
    (a peer silent or trickling in the middle of a handshake) then ends at once, whatever the step."""

    def __init__(self, conn: Connection, seconds: float) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._ended = False
        self._cut = False
        self._timer = threading.Timer(max(0.0, seconds), self._shut)
        self._timer.daemon = True
        self._timer.start()

    def _shut(self) -> None:
        with self._lock:  # `conn` stays open until end() has run: its fd is still this socket's
            if self._ended:
                return
            self._cut = True
            probe = socket.socket(fileno=self._conn.fileno())
            try:
                probe.shutdown(socket.SHUT_RDWR)
            except OSError:  # the peer reset it already
                pass
            finally:
                probe.detach()

    def end(self) -> bool:
        """Stop the clock; True when the bound passed first (the socket is shut down: the link is unusable)."""
        self._timer.cancel()
        with self._lock:
            self._ended = True
            return self._cut
