"""Mooncake notifications to a peer that does not answer hold each send for Mooncake's handshake timeout
(measured with 0.3.13 on CPU: 61 s for a peer whose port accepts but never answers). They used to leave from one
thread for every peer, so one hung peer held up every other peer's notifications behind it: a decode's release
to a healthy prefill (which then kept the blocks until its lease), a prefill's push_failed (the decode waited for
its deadline). Each peer session now has its own order: a stuck one delays only its own notifications."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.mooncake import notifier
from pdlaunch.kv_transfer.mooncake.agent import MooncakeAgent, PeerMetadata
from pdlaunch.kv_transfer.mooncake.sender import TransferPool
from pdlaunch.kv_transfer.notifications import ReadDone, encode_notification, parse_notification

WAIT_S = 30.0
MAC_HEX = 64
HUNG = "10.0.0.7:17000"


class _Engine:
    """Sends to HUNG block until `release` is set; others are delivered at once, recorded per session."""

    protocol = "tcp"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.hung_sending = threading.Event()
        self.delivered: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def notify(self, session: str, name: str, message: str) -> None:
        if session == HUNG:
            self.hung_sending.set()
            assert self.release.wait(WAIT_S), "the test never let the hung peer answer"
        notif = parse_notification(message[MAC_HEX:].encode())
        assert notif is not None and isinstance(notif, ReadDone)
        with self._lock:
            self.delivered.setdefault(session, []).append(notif.request_id)

    def sent(self, session: str) -> list[str]:
        with self._lock:
            return list(self.delivered.get(session, []))


@pytest.fixture
def pool() -> Iterator[TransferPool]:
    pool = TransferPool(0, workers=1)
    yield pool
    pool.shutdown()


def _release(request_id: str) -> bytes:
    return encode_notification(ReadDone(load="load-0", kind="release", request_id=request_id, reader="D"))


def _until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {WAIT_S}s"
        time.sleep(0.005)


def test_a_hung_peer_delays_only_its_own_notifications(pool: TransferPool) -> None:
    engine = _Engine()
    agent = MooncakeAgent("decode-agent", cast(Any, engine), pool, "s" * 32)
    for name, session in (("hung-prefill", HUNG), ("healthy-prefill", "10.0.0.8:17000")):
        agent.add_remote(PeerMetadata(name=name, session=session, protocol="tcp").model_dump_json().encode())
    try:
        agent.notify("hung-prefill", _release("h-1"))
        agent.notify("hung-prefill", _release("h-2"))
        assert engine.hung_sending.wait(WAIT_S), "the first notification to the hung peer was never sent"
        for i in range(3):
            agent.notify("healthy-prefill", _release(f"ok-{i}"))
        _until(lambda: engine.sent("10.0.0.8:17000") == ["ok-0", "ok-1", "ok-2"],
               "the healthy peer's notifications, in order, while the other peer hangs")
        assert engine.sent(HUNG) == []
    finally:
        engine.release.set()
    _until(lambda: engine.sent(HUNG) == ["h-1", "h-2"], "the hung peer's notifications, in order, once it answers")
    agent._notifier.shutdown()


def test_shutdown_waits_for_a_hung_peer_only_so_long_and_says_what_it_dropped(
        pool: TransferPool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(notifier, "SHUTDOWN_WAIT_SECONDS", 0.2)
    engine = _Engine()
    agent = MooncakeAgent("decode-agent", cast(Any, engine), pool, "s" * 32)
    agent.add_remote(PeerMetadata(name="hung-prefill", session=HUNG, protocol="tcp").model_dump_json().encode())
    try:
        agent.notify("hung-prefill", _release("h-1"))
        agent.notify("hung-prefill", _release("h-2"))
        assert engine.hung_sending.wait(WAIT_S), "the first notification to the hung peer was never sent"
        with caplog.at_level(logging.WARNING, logger="pdlaunch.kv_transfer.mooncake.notifier"):
            agent._notifier.shutdown()
        assert [r.getMessage() for r in caplog.records] == [
            f"Mooncake notifications to session(s) {HUNG} not sent within 0s of shutdown (the peer does not "
            "answer): dropped"]
        with pytest.raises(KVTransferError, match="the Mooncake agent is closed"):
            agent.notify("hung-prefill", _release("h-3"))
    finally:
        engine.release.set()
    _until(lambda: not agent._notifier._threads, "the hung peer's thread ending after its send")
    assert engine.sent(HUNG) == ["h-1"]
