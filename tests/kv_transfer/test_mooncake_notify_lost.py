"""A Mooncake notification that cannot be delivered is logged, whatever the failure: with the peer, its
kind and what its loss costs the peer (which then waits for its own timeout). notify() itself never
raises for it, as a NIXL notification's send does not. A push_done goes by push_done() instead: it is the push
itself (test_mooncake_push_done_retry), sent twice at most, and raises when both sends fail."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.mooncake.agent import MooncakeAgent, PeerMetadata
from pdlaunch.kv_transfer.mooncake.sender import TransferPool
from pdlaunch.kv_transfer.notifications import PushDone, PushFailed, ReadDone, encode_notification

WAIT_S = 30.0


class _Engine:
    """Fails every notification with `error`."""

    protocol = "tcp"

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.tried = threading.Event()

    def notify(self, session: str, name: str, message: str) -> None:
        self.tried.set()
        raise self.error


@pytest.fixture
def pool() -> Iterator[TransferPool]:
    pool = TransferPool(0, workers=1)
    yield pool
    pool.shutdown()


def _send(pool: TransferPool, error: Exception, message: bytes, push_done: bool = False) -> None:
    """notify() (push_done() where `push_done`) once through an engine that fails with `error`, and wait for the
    notifier thread."""
    agent = MooncakeAgent("prefill-agent", cast(Any, _Engine(error)), pool, "s" * 32)
    peer = agent.add_remote(PeerMetadata(name="decode-agent", session="10.0.0.7:17000",
                                         protocol="tcp").model_dump_json().encode())
    try:
        (agent.push_done if push_done else agent.notify)(peer, message)
    finally:
        agent._notifier.shutdown()  # waits for the send


@pytest.mark.parametrize("error", [KVTransferError("Mooncake could not notify 10.0.0.7:17000 (code -1)"),
                                   RuntimeError("engine closed")])
def test_a_lost_push_failed_is_logged_with_the_peer_and_the_decodes_wait(
        pool: TransferPool, caplog: pytest.LogCaptureFixture, error: Exception) -> None:
    with caplog.at_level(logging.WARNING, logger="pdlaunch.kv_transfer.mooncake.agent"):
        _send(pool, error, encode_notification(PushFailed(kind="push_failed", nonce="n-1", error="WRITE failed")))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "Mooncake push_failed notification to decode-agent (session 10.0.0.7:17000) not delivered" in lines[0]
    assert str(error) in lines[0]
    assert "the decode fails the request at its load's deadline (kv_transfer.transfer_timeout_seconds)" in lines[0]


def test_a_push_done_that_cannot_be_sent_twice_raises(pool: TransferPool, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pdlaunch.kv_transfer.mooncake.agent"), \
            pytest.raises(KVTransferError, match="could not notify 10.0.0.7:17000"):
        _send(pool, KVTransferError("Mooncake could not notify 10.0.0.7:17000 (code -1)"),
              encode_notification(PushDone(kind="push_done", nonce="n-1")), push_done=True)
    [line] = [r.getMessage() for r in caplog.records]
    assert "Mooncake push_done notification to decode-agent (session 10.0.0.7:17000) not delivered" in line
    assert "sending it again" in line


def test_a_lost_read_done_says_the_prefill_keeps_the_blocks_until_its_lease(
        pool: TransferPool, caplog: pytest.LogCaptureFixture) -> None:
    notif = ReadDone(load="load-0", kind="read_done", request_id="p-1", reader="D")
    with caplog.at_level(logging.WARNING, logger="pdlaunch.kv_transfer.mooncake.agent"):
        _send(pool, ValueError("bad session"), encode_notification(notif))
    [line] = [r.getMessage() for r in caplog.records]
    assert "Mooncake read_done notification to decode-agent" in line and "ValueError: bad session" in line
    assert "keeps the request's blocks until its hold's lease (kv_transfer.kv_lease_seconds)" in line
