"""The socket under a rank's link (a TCP connection to a rank on another node, or a local worker's duplex pipe):
keepalive, a bound on sends, whether the peer closed it, its far end, and what a link given up means.

`Connection` owns the descriptor; each helper looks at it through a socket object it detaches again.
"""

from __future__ import annotations

import errno
import socket
import struct
from multiprocessing.connection import Connection

from pdlaunch.config.addresses import host_port
from pdlaunch.errors import EngineError

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
        return host_port(host, port)
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
