"""The step stream between rank 0 and ranks on other nodes: a TCP `Connection` (the same API as the
pipes local workers use), authenticated with the instance's link key.

Rank 0 opens a `RankListener` (rank_listener.py) on its node's address and publishes it in the group's
rendezvous store (torch.distributed TCPStore at the rank-0 node's address and the instance's master_port); a
remote rank opens that store (`open_store`), reads the listener's address there and connects
(`connect_to_rank0`). The first message names the rank (Hello); rank 0 answers with what the rank cannot read
from its own config (Setup). The messages are those of messages.py; link_socket.py keeps both ends' sockets
(keepalive, send bounds, a closed peer).
"""

from __future__ import annotations

import socket
import struct
import time
from datetime import timedelta
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

import torch.distributed as dist

from pdlaunch.distributed import parallel_state
from pdlaunch.distributed.link_socket import LINK_DEAD_AFTER_S, keep_alive
from pdlaunch.distributed.message_stream import send
from pdlaunch.distributed.messages import Hello
from pdlaunch.distributed.rank_listener import LISTENER_KEY
from pdlaunch.distributed.rendezvous_failure import store_unreached
from pdlaunch.errors import EngineError

# A remote rank's connect and key exchange with rank 0's listener; rank 0 greets one peer at a time, each
# within rank_listener.HELLO_TIMEOUT_S, so this leaves room for a few ahead in its queue.
CONNECT_TIMEOUT_S = 60.0


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
