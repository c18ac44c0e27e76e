"""A remote rank dialing rank 0's link (remote_link.connect_to_rank0): a listener that accepts the connection
but never answers (rank 0 stopped, or past accepting its ranks and loading its model) fails the rank within
CONNECT_TIMEOUT_S, naming the address, instead of hanging it; a listener that answers gives a link with no
receive timeout left on it (steps may be minutes apart), and both ends of it probe a silent peer (TCP keepalive)
so a node that vanishes without closing its links is noticed within a minute."""

from __future__ import annotations

import gc
import socket
import struct
import threading
import types
from multiprocessing.connection import Connection

import pytest
from torch.distributed import TCPStore

from pdlaunch.distributed import link_socket, parallel_state, remote_link
from pdlaunch.distributed.rank_listener import RankListener
from pdlaunch.distributed.remote_link import connect_to_rank0
from pdlaunch.errors import EngineError

KEY = b"test-link-key"
GUARD_S = 60.0  # only bounds a broken test (a hang); the fixed dial gives up after CONNECT_TIMEOUT_S


def store_naming(address: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(get=lambda key: address.encode())


def test_a_listener_that_never_answers_fails_the_rank_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_link, "CONNECT_TIMEOUT_S", 1.0, raising=False)
    errors: list[BaseException] = []

    def dial(address: str) -> None:
        try:
            connect_to_rank0(store_naming(address), 1, KEY)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    # the kernel completes the connection into the backlog; nobody accepts it, nobody speaks
    with socket.create_server(("127.0.0.1", 0), backlog=4) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        rank = threading.Thread(target=dial, args=(address,), daemon=True)
        rank.start()
        rank.join(GUARD_S)
        assert not rank.is_alive(), "the rank waited for the silent listener without a bound"
    assert len(errors) == 1 and isinstance(errors[0], EngineError), errors
    assert errors[0].message == f"TP rank 1: rank 0's link at {address} did not answer within 1s"


def _linked(listener: RankListener) -> tuple[Connection, Connection]:
    """(rank 0's end, rank 1's end) of a link rank 1 dialed to `listener`, as a remote rank does."""
    dialed: list[Connection] = []
    rank = threading.Thread(target=lambda: dialed.append(
        connect_to_rank0(store_naming(listener.address), 1, KEY)), daemon=True)  # type: ignore[arg-type]
    rank.start()
    accepted = listener.accept({1: "node 1 (127.0.0.1)"}, timeout_s=GUARD_S)
    rank.join(GUARD_S)
    assert list(accepted) == [1] and len(dialed) == 1
    return accepted[1], dialed[0]

def test_a_link_dialed_to_a_listener_keeps_no_receive_timeout() -> None:
    listener = RankListener("127.0.0.1", KEY)
    try:
        rank0_conn, rank_conn = _linked(listener)
        probe = socket.socket(fileno=rank_conn.fileno())
        try:
            assert probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16) == struct.pack("ll", 0, 0)
        finally:
            probe.detach()
        rank0_conn.close()
        rank_conn.close()
    finally:
        listener.close()


def tcp_options(conn: object) -> dict[str, int]:
    """The keepalive and user-timeout settings of the socket under a link (a Connection)."""
    probe = socket.socket(fileno=conn.fileno())  # type: ignore[attr-defined]
    try:
        return {"keepalive": probe.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                "idle": probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                "interval": probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                "probes": probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                "user_timeout_ms": probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)}
    finally:
        probe.detach()


def test_both_ends_of_a_link_notice_a_vanished_node_within_a_minute() -> None:
    """A node that loses power or its network sends no FIN: with Linux's keepalive defaults (first probe after
    2 h idle) neither end noticed before a collective timed out, or ever on an idle link. A vanished host
    cannot be simulated here: the settings on the sockets both ends really use are what is checked."""
    listener = RankListener("127.0.0.1", KEY)
    try:
        rank0_conn, rank_conn = _linked(listener)
        rank0_end, rank_end = tcp_options(rank0_conn), tcp_options(rank_conn)
        rank0_conn.close()
        rank_conn.close()
    finally:
        listener.close()
    for end in (rank0_end, rank_end):
        assert end["keepalive"] == 1, end
        assert end["idle"] + end["interval"] * end["probes"] == link_socket.LINK_DEAD_AFTER_S < 60, end
    # The rank's replies to a vanished rank 0 are never acknowledged (keepalive does not probe then); rank 0
    # bounds its own sends (SEND_TIMEOUT_S) and leaves a busy rank's full receive window alone.
    assert rank_end["user_timeout_ms"] == link_socket.LINK_DEAD_AFTER_S * 1000, rank_end
    assert rank0_end["user_timeout_ms"] == 0, rank0_end


def test_a_store_without_rank0s_link_fails_the_rank_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 opens its store, then its listener: one that fails in between (its listener cannot bind, it dies)
    leaves the rank's store read to time out or break. That torch error escaped remote_rank.main's handling
    (PdlaunchError, OSError, EOFError) as a bare traceback; it is now the rank's error, naming what it waited for."""
    # torch's store server listens on every interface: dropped at the end, it leaves no socket in this worker
    # (test_side_channel_auth checks that this process listens on loopback only).
    master = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setattr(parallel_state, "STORE_TIMEOUT_S", 0.5)  # how long the rank's read waits for the link
    try:
        store = remote_link.open_store("127.0.0.1", master.port, timeout_s=0.5)
        with pytest.raises(EngineError) as failed:
            connect_to_rank0(store, 1, KEY)
    finally:
        del master
        gc.collect()
    assert failed.value.message.startswith("TP rank 1 found no link of rank 0 in its rendezvous store: "), failed.value
    assert failed.value.field == "parallel.nodes" and "rank 0's log" in (failed.value.hint or "")
