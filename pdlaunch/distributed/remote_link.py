"""The step stream between rank 0 and ranks on other nodes: a TCP `Connection` (the same API as the
pipes local workers use), authenticated with the instance's link key.

Rank 0 opens a `RankListener` on its node's address and publishes it in the group's rendezvous
store (torch.distributed TCPStore at the rank-0 node's address and the instance's master_port); a
remote rank reads it there and connects. The first message names the rank (Hello); rank 0 answers with
what the rank cannot read from its own config (Setup). The messages are those of messages.py.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
import time
from datetime import timedelta
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

import torch.distributed as dist

from pdlaunch.distributed import parallel_state
from pdlaunch.distributed.join_waits import RENDEZVOUS_SETTING
from pdlaunch.distributed.message_stream import UnexpectedMessage, recv_as, send
from pdlaunch.distributed.messages import Hello
from pdlaunch.distributed.rendezvous_failure import store_unreached
from pdlaunch.errors import EngineError

log = logging.getLogger(__name__)

LISTENER_KEY = "pdlaunch/remote_rank_listener"  # store key: "host:port" of rank 0's listener
HELLO_TIMEOUT_S = 10.0  # a connected peer passes the key exchange and names its rank within this
# A remote rank's connect and key exchange with rank 0's listener; rank 0 greets one peer at a time, each
# within HELLO_TIMEOUT_S, so this leaves room for a few ahead in its queue.
CONNECT_TIMEOUT_S = 60.0
# A node that vanishes without closing its links (power loss, a network partition) sends no FIN or reset, and
# Linux probes an idle connection only after 2 hours: neither end would learn it before a collective timed out,
# or ever on an idle link. Both ends probe after KEEPALIVE_IDLE_S of silence, then every KEEPALIVE_INTERVAL_S;
# KEEPALIVE_PROBES unanswered ones close the link, which the watchdog (rank 0) or the rank's poll then sees.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 3
LINK_DEAD_AFTER_S = KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_PROBES
# tcp_info's first byte, the TCP state (Linux include/net/tcp_states.h): CLOSE_WAIT, the peer closed its end;
# CLOSE, the connection is gone (reset)
PEER_CLOSED_TCP_STATES = (8, 7)


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


def connect_to_rank0(store: dist.Store, rank: int, authkey: bytes) -> Connection:
    """A remote rank's side: find rank 0's listener in the store and say who we are."""
    try:
        address = store.get(LISTENER_KEY).decode()
    except (RuntimeError, dist.DistError) as exc:  # the store's own wait timed out, or rank 0 (its host) went
        raise EngineError(f"TP rank {rank} found no link of rank 0 in its rendezvous store: {exc}",
                          field="parallel.nodes", hint="rank 0 failed before it listened for its ranks, or its "
                          "store is gone: see rank 0's log on node 0") from exc
    host, port = address.rsplit(":", 1)
    try:
        conn = _dial(host, int(port), authkey)
    except (BlockingIOError, TimeoutError) as exc:
        raise EngineError(f"TP rank {rank}: rank 0's link at {address} did not answer within "
                          f"{CONNECT_TIMEOUT_S:.0f}s", field="parallel.nodes",
                          hint="rank 0 is stopped, hung, or past accepting its ranks (see its log)") from exc
    except (AuthenticationError, OSError, EOFError) as exc:
        raise EngineError(f"TP rank {rank} cannot join rank 0's link at {address}: {exc}", field="parallel.nodes",
                          hint="every node must run the same config (and the same PDLAUNCH_TP_SECRET)") from exc
    send(conn, Hello(rank))
    return conn


def _dial(host: str, port: int, authkey: bytes) -> Connection:
    """An authenticated connection to rank 0's listener, as multiprocessing's Client makes it, but with the
    connect and the key exchange bounded by CONNECT_TIMEOUT_S (Client waits for an answer forever)."""
    raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    raw.setblocking(True)  # Connection reads a blocking fd; a silent listener times out through SO_RCVTIMEO
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(CONNECT_TIMEOUT_S), 0))
    conn = Connection(raw.detach())
    try:
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
    except BaseException:
        conn.close()
        raise
    probe = socket.socket(fileno=conn.fileno())
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))  # steps may idle long
    keep_alive(probe, unacked_s=LINK_DEAD_AFTER_S)  # a reply in flight to a vanished rank 0: no keepalive probes
    probe.detach()
    return conn


def keep_alive(sock: socket.socket, unacked_s: int | None) -> None:
    """Make the idle TCP link `sock` fail within LINK_DEAD_AFTER_S once its peer's node is gone without a word.
    Keepalive does not probe while sent data awaits its acknowledgement (TCP retransmits it for ~15 minutes):
    `unacked_s` (TCP_USER_TIMEOUT) fails the link when data stays unacknowledged that long."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    if unacked_s is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, unacked_s * 1000)


def open_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of the rendezvous store rank 0 hosts (waits up to `timeout_s` for it to come up). Its blocking reads
    then wait STORE_TIMEOUT_S, as a local worker's do: rank 0 publishes its link as it opens the store, and NCCL's
    unique id as it joins; `timeout_s` (this node's launcher may start long before node 0's, or
    parallel.rendezvous_timeout_seconds, up to a week) would hold a rank that long on a rank 0 hung in between."""
    started = time.monotonic()
    try:
        client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistError) as exc:
        raise store_unreached(f"{host}:{port}", exc, time.monotonic() - started, timeout_s, "parallel.master_port",
                              "start node 0's launcher (it runs rank 0) and check the nodes reach each other") from exc
    client.set_timeout(timedelta(seconds=parallel_state.STORE_TIMEOUT_S))
    return client


def set_send_timeout(conn: Connection, seconds: float) -> None:
    """Make a send on `conn` (a socket: a duplex pipe or a TCP link) raise BlockingIOError once the
    peer has taken nothing for `seconds`, instead of blocking for as long as the peer is hung."""
    whole = int(seconds)
    probe = socket.socket(fileno=conn.fileno())
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                         struct.pack("ll", whole, int((seconds - whole) * 1_000_000)))
    finally:
        probe.detach()  # the fd stays owned by `conn`


def is_closed(conn: Connection) -> bool:
    """True when the peer closed `conn`. A pending message alone is not a close, but a TCP link closed
    behind one is (a rank sends why it failed, then exits): peeking sees only the message, the TCP state
    the close. A `conn` closed here (rank 0 shutting down under its watchdog) is closed too."""
    try:
        probe = socket.socket(fileno=conn.fileno())
    except OSError:  # "handle is closed", or its fd already gone
        return True
    try:
        if probe.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_INFO"):
            if probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] in PEER_CLOSED_TCP_STATES:
                return True
        return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        probe.detach()  # the fd stays owned by `conn`


def peer_address(conn: Connection) -> str | None:
    """"HOST:PORT" of the far end of `conn` when it is a TCP link (None for a local pipe, or a closed link)."""
    try:
        probe = socket.socket(fileno=conn.fileno())
    except OSError:
        return None
    try:
        if probe.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        host, port = probe.getpeername()[:2]
        return f"[{host}]:{port}" if probe.family == socket.AF_INET6 else f"{host}:{port}"
    except OSError:
        return None
    finally:
        probe.detach()  # the fd stays owned by `conn`


def link_timed_out(exc: BaseException, peer: str, address: str) -> EngineError | None:
    """What ETIMEDOUT on the link to `peer` (at `address`, "HOST:PORT") means, or None for another error: the
    kernel gave the link up after LINK_DEAD_AFTER_S of unanswered keepalive probes (or unacknowledged sends)."""
    if not isinstance(exc, OSError) or exc.errno != errno.ETIMEDOUT:
        return None
    host = address.rsplit(":", 1)[0]
    return EngineError(f"the link to {peer} at {address} stopped answering keepalive probes for {LINK_DEAD_AFTER_S}s "
                       "(its host, or the network between the nodes, went away)", field="parallel.nodes",
                       hint=f"check that {host} is up and that this node reaches it: a rebooted or powered-off "
                       f"host, a network partition or a firewall; if it is up, its log says why {peer} stopped")
