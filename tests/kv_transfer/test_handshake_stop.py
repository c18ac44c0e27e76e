"""A decode load that ends while it waits for a KV handshake (its client left, its deadline passed) stops waiting at
once and frees its loader thread: the wait for the handshake's answer, and the wait for another load's handshake
with the same prefill engine, both look at the load's end every client.STOP_POLL_SECONDS. They used to wait out the
handshake timeout (10 s by default). A real side channel whose handshake handler answers only when the test ends;
the decode's real peer cache. Through real instances: tests/serving/test_failed_handshake_release_e2e.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode.peers import PeerCache
from pdlaunch.kv_transfer.messages import HandshakeAnswer, HandshakeRequest
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import handshake_for, make_spec

WAIT_S = 60.0  # generous for a loaded 2-core machine
HANDSHAKE_S = 600.0  # the handshake timeout: a wait that ends within the test's waits ended by the load's end


class _Prefill:
    """A side channel whose handshake handler answers once the test lets it."""

    def __init__(self) -> None:
        self.asked, self.answer = threading.Event(), threading.Event()
        self.server = SideChannelServer("127.0.0.1", 0, {"handshake": self.handshake}, KEYS)

    def handshake(self, message: HandshakeRequest) -> HandshakeAnswer:
        self.asked.set()
        assert self.answer.wait(WAIT_S * 2), "the test never let the handshake answer"
        return HandshakeAnswer(info=handshake_for(make_spec()))


@pytest.fixture
def prefill() -> Iterator[_Prefill]:
    side = _Prefill()
    try:
        yield side
    finally:
        side.answer.set()
        side.server.shutdown()
        side.server.server_close()


def _get(executor: ThreadPoolExecutor, peers: PeerCache, remote: RemoteKV, ended: threading.Event) -> Future[Any]:
    return executor.submit(peers.get, remote, stopped=ended.is_set)


def test_loads_that_end_while_they_wait_for_a_handshake_stop_waiting_at_once(prefill: _Prefill) -> None:
    peers = PeerCache(cast(Any, None), make_spec, cast(Any, None), "pull", HANDSHAKE_S, KEYS, reader="decode")
    remote = RemoteKV(engine_id="P", request_id="p-1", host="127.0.0.1", port=prefill.server.port)
    first_ended, second_ended = threading.Event(), threading.Event()
    with ThreadPoolExecutor(max_workers=2) as executor:
        first = _get(executor, peers, remote, first_ended)  # shakes hands: waits for the answer
        assert prefill.asked.wait(WAIT_S), "the first load never asked for the handshake"
        second = _get(executor, peers, remote, second_ended)  # waits for the first load's handshake
        second_ended.set()
        with pytest.raises(KVTransferError, match="gave up waiting for the KV handshake with prefill engine P"):
            second.result(timeout=WAIT_S)
        assert not first.done(), "the first load's handshake ended with the second load"
        first_ended.set()
        with pytest.raises(KVTransferError, match="KV handshake with prefill engine P: given up before"):
            first.result(timeout=WAIT_S)
        assert not prefill.answer.is_set()  # neither wait ended by an answer
    assert peers.snapshot() == {}  # a handshake given up is not cached: the next load shakes hands again
