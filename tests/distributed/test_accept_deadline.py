"""RankListener.accept (rank 0 awaiting its ranks on other nodes) keeps to its deadline. Each step of a peer's
handshake had its own bound (the key exchange's reads HELLO_TIMEOUT_S each, the wait for Hello HELLO_TIMEOUT_S,
the Hello's read MESSAGE_STALL_S): a peer connecting just before the deadline and then stalling held accept
~10-60 s past it. Now the whole handshake gets what is left of the deadline (HELLO_TIMEOUT_S at most), a read
blocked at that bound ends, and the error names the ranks that never joined and the peer refused meanwhile."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

import pytest

from pdlaunch.distributed import rank_listener
from pdlaunch.distributed.rank_listener import RankListener
from pdlaunch.distributed.remote_link import connect_to_rank0
from pdlaunch.errors import EngineError
from tests.distributed.test_audit_remote_link import store_naming

KEY = b"test-link-key"
TIMEOUT_S = 1.5  # accept's deadline here
SLACK_S = 3.0  # a loaded CI machine's lateness; the bounds this replaces overran by 10 s and more
EXPECTED = {1: "node 1 (127.0.0.1)"}


def silent(conn: Connection) -> None:
    """Connects, never speaks (not even the key exchange)."""


def authenticated_then_silent(conn: Connection) -> None:
    answer_challenge(conn, KEY)
    deliver_challenge(conn, KEY)


def authenticated_then_half_a_hello(conn: Connection) -> None:
    authenticated_then_silent(conn)
    os.write(conn.fileno(), struct.pack("!i", 1000) + b"x" * 10)  # a length header and a part: then nothing


def peer(address: str, behave: Callable[[Connection], None], done: threading.Event,
         connected: threading.Event | None = None) -> None:
    host, port = address.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=30)
    if connected is not None:
        connected.set()  # in the listener's queue
    raw.setblocking(True)
    conn = Connection(raw.detach())
    try:
        behave(conn)
        done.wait(60)  # holds the link open, silent, until the test ends
    except (OSError, EOFError):
        pass
    finally:
        conn.close()


@pytest.mark.parametrize("behave", [silent, authenticated_then_silent, authenticated_then_half_a_hello],
                         ids=lambda f: f.__name__)
def test_a_peer_stalling_its_handshake_does_not_hold_accept_past_its_deadline(
        behave: Callable[[Connection], None]) -> None:
    listener = RankListener("127.0.0.1", KEY)
    done = threading.Event()
    stalling = threading.Thread(target=peer, args=(listener.address, behave, done), daemon=True)
    stalling.start()
    start = time.monotonic()
    try:
        with pytest.raises(EngineError) as err:
            listener.accept(EXPECTED, timeout_s=TIMEOUT_S)
        took = time.monotonic() - start
    finally:
        done.set()
        listener.close()
        stalling.join(30)
    assert took < TIMEOUT_S + SLACK_S, f"accept took {took:.1f}s with a {TIMEOUT_S}s deadline"
    text = err.value.message
    assert text.startswith(f"TP rank 1 on node 1 (127.0.0.1) did not connect to rank 0 at {listener.address} "
                           "within 1.5s (parallel.rendezvous_timeout_seconds); refused meanwhile: a peer at "
                           "127.0.0.1:"), text
    assert "did not finish its handshake within" in text, text
    assert err.value.field == "parallel.nodes"


def test_a_stalling_peer_gets_hello_timeout_and_the_rank_behind_it_still_joins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rank_listener, "HELLO_TIMEOUT_S", 0.5)
    listener = RankListener("127.0.0.1", KEY)
    done, connected = threading.Event(), threading.Event()
    stalling = threading.Thread(target=peer, args=(listener.address, authenticated_then_half_a_hello, done,
                                                   connected), daemon=True)
    stalling.start()
    assert connected.wait(30)
    dialed: list[Connection] = []
    rank = threading.Thread(target=lambda: dialed.append(
        connect_to_rank0(store_naming(listener.address), 1, KEY)), daemon=True)  # type: ignore[arg-type]
    rank.start()
    start = time.monotonic()
    try:
        conns = listener.accept(EXPECTED, timeout_s=30)
        took = time.monotonic() - start
    finally:
        done.set()
        listener.close()
        stalling.join(30)
        rank.join(30)
    assert took < 0.5 + SLACK_S, f"the stalling peer ahead held accept for {took:.1f}s"
    assert list(conns) == [1] and len(dialed) == 1
    conns[1].close()
    dialed[0].close()
