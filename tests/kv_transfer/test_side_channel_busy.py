"""A side channel at its connection limit: the server closes its longest idle kept connection (never one serving a
request) to admit a new one, and a client refused busy asks again until its deadline, then says the prefill's side
channel was full. Also the replay table: nonces expire oldest first, a check prunes only what expired, and a full
table refuses busy."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.messages import Empty, HandshakeRequest
from pdlaunch.kv_transfer.side_channel import client
from pdlaunch.kv_transfer.side_channel.server import NONCE_LIFETIME_SECONDS, NonceTable, SideChannelServer
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.side_channel_client import authed, read_answer
from tests.serving.helpers import wait_for

HANDSHAKE = HandshakeRequest(type="handshake", engine_id="e")


def _handshake(_msg: HandshakeRequest) -> Empty:
    return Empty()


@pytest.fixture
def pools() -> Iterator[list[client.Connections]]:
    made: list[client.Connections] = []
    yield made
    for pool in made:
        pool.close()


def _kept(server: SideChannelServer, pools: list[client.Connections]) -> socket.socket:
    """A decode's connection kept for reuse after one answer (client.Connections), idle on the server."""
    pool = client.Connections()
    pools.append(pool)
    client.request("127.0.0.1", server.port, HANDSHAKE, Empty, 5.0, "handshake", KEYS, pool)
    (sock, _), = pool._idle[("127.0.0.1", server.port)]
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_idle_kept_connections_give_way_to_a_new_request_oldest_first(pools: list[client.Connections]) -> None:
    server = SideChannelServer("127.0.0.1", 0, {"handshake": _handshake}, KEYS, max_connections=2)
    try:
        kept = [_kept(server, pools), _kept(server, pools)]
        wait_for(lambda: len(server._idle) == 2, "both kept connections idle on the server")
        assert server.num_connections() == 2
        # Which one the server has held idle longest: its handler threads mark them idle after answering, so on a
        # loaded machine the second answered may be marked first. Matched by address, server side to client side.
        longest = min(server._idle, key=server._idle.__getitem__).getpeername()
        oldest, = (sock for sock in kept if sock.getsockname() == longest)
        newer, = (sock for sock in kept if sock is not oldest)
        first_pool = pools[kept.index(oldest)]
        client.request("127.0.0.1", server.port, HANDSHAKE, Empty, 20.0, "handshake", KEYS)
        wait_for(lambda: _closed_by_peer(oldest), "the server to close the longest idle connection")
        assert not _closed_by_peer(newer)
        # The decode that kept the closed one sends on a new connection; the newer kept one still serves.
        for pool in (first_pool, *(p for p in pools if p is not first_pool)):
            client.request("127.0.0.1", server.port, HANDSHAKE, Empty, 20.0, "handshake", KEYS, pool)
    finally:
        server.close()


def test_a_connection_serving_a_request_is_never_closed_for_a_new_one(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def slow_handshake(_msg: HandshakeRequest) -> Empty:
        assert release.wait(30), "the test never released the handler"
        return Empty()

    server = SideChannelServer("127.0.0.1", 0, {"handshake": slow_handshake}, KEYS, max_connections=1)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as serving:
            serving.sendall(authed(KEYS, HANDSHAKE.model_dump(mode="json")))
            wait_for(lambda: server.num_connections() == 1, "the first request to be served")
            outcome: list[object] = []

            def new_request() -> None:
                try:
                    outcome.append(client.request("127.0.0.1", server.port, HANDSHAKE, Empty, 30.0, "handshake", KEYS))
                except KVTransferError as e:
                    outcome.append(e.render())

            with caplog.at_level(logging.WARNING):
                waiting = threading.Thread(target=new_request, daemon=True)
                waiting.start()
                wait_for(lambda: "too many side-channel connections" in caplog.text, "the new request refused busy")
                release.set()
                answer = read_answer(serving)  # its request is answered: the connection was not closed mid-request
                assert answer is not None and answer["answer"]["ok"], answer
                waiting.join(30)  # then the one refused busy is served in its place, within its timeout
                assert outcome == [Empty()]
    finally:
        release.set()
        server.close()


def test_a_client_refused_busy_until_its_deadline_says_the_side_channel_was_full() -> None:
    server = SideChannelServer("127.0.0.1", 0, {"handshake": _handshake}, KEYS, max_connections=1)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30):  # a peer that sends nothing yet
            wait_for(lambda: server.num_connections() == 1, "the silent peer to be served")
            with pytest.raises(KVTransferError) as raised:
                client.request("127.0.0.1", server.port, HANDSHAKE, Empty, 1.5, "handshake", KEYS)
        text = raised.value.render()
        assert "the prefill's side channel at 127.0.0.1" in text and "was full for" in text
        assert "of the 1.5s allowed" in text and "too many side-channel connections" in text
        assert "kv_transfer.handshake_timeout_seconds" in text
    finally:
        server.close()


def test_nonces_expire_oldest_first_and_a_check_prunes_only_what_expired() -> None:
    table = NonceTable()
    for i in range(18000):  # 60 s of 300 requests/s: all within their lifetime
        assert table.admit(f"n{i}", i / 300) is None
    now = 59.9
    assert table.admit("new", now) is None and table.pruned == 0 and len(table) == 18001
    assert table.admit("n17999", now) == "the frame was seen before (a replay)"
    # The next second at the same rate: each check drops the one nonce whose lifetime just ended, no more.
    for i in range(300):
        pruned = table.pruned
        assert table.admit(f"m{i}", NONCE_LIFETIME_SECONDS + i / 300) is None
        assert table.pruned - pruned == 1
    assert len(table) == 18001
    assert table.admit("n300", NONCE_LIFETIME_SECONDS + 299 / 300) == "the frame was seen before (a replay)"
    assert table.admit("n299", NONCE_LIFETIME_SECONDS + 299 / 300) is None  # its lifetime (and ts window) ended


def test_a_full_nonce_table_refuses_busy_and_takes_nonces_again_as_they_expire() -> None:
    table = NonceTable(max_nonces=2)
    assert table.admit("a", 0.0) is None and table.admit("b", 1.0) is None
    refused = table.admit("c", 2.0)
    assert refused is not None and refused.startswith("busy: 2 requests within the last")
    assert table.admit("a", 2.0) == "the frame was seen before (a replay)"
    assert table.admit("c", NONCE_LIFETIME_SECONDS) is None and len(table) == 2  # "a" expired: room for one


def test_a_server_with_a_full_nonce_table_is_retried_then_reported_full() -> None:
    server = SideChannelServer("127.0.0.1", 0, {"handshake": _handshake}, KEYS)
    try:
        server._seen.max_nonces = 1
        client.request("127.0.0.1", server.port, HANDSHAKE, Empty, 5.0, "handshake", KEYS)
        with pytest.raises(KVTransferError, match="was full for .* remembers to refuse replays"):
            client.request("127.0.0.1", server.port, HANDSHAKE, Empty, 1.0, "handshake", KEYS)
    finally:
        server.close()
