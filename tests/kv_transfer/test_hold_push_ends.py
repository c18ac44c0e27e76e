"""Each way one decode's push can go, driven through the prefill's HoldTable with the side channel's real messages
and its sender (PushSender): the hold is reported in finished_sending (`poll`) exactly once, and at the first poll
after the push ended (its last chunk landed, it failed, or the decode cancelled it), not at its lease. Only a decode
that dies between two chunks of a staged push without a word leaves its hold to the lease.

A push's load stays in Hold.push_owners while its push is under way (prefill/hold.py `through`), and a read_done or
another push's last chunk ends the hold only once none is: every path that adds a load there must take it out, or the
hold of a prompt two decodes took (a proxy's retried decode leg) lives until its lease."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.messages import CancelPushAnswer, CancelPushRequest, Empty, PushRequest
from pdlaunch.kv_transfer.notifications import PushDone, PushFailed, ReadDone, parse_notification
from pdlaunch.kv_transfer.prefill.hold import Hold
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.push_sender import PushSender
from pdlaunch.kv_transfer.prefill.side import PrefillSide
from tests.kv_transfer.pd_procs import make_spec
from tests.serving.helpers import wait_for

LEASE_S = 60.0
WAIT_S = 30.0  # generous: every wait below ends on its condition well before this
LOAD = "0123456789abcdef"  # the decode load's nonce (PushRequest.owner)
READER = "decode-a-engine"  # a second decode, pulling the same hold (the proxy retried the decode leg there)


class _Write:
    """A WRITE that lands when `land` is set (at once by default), or fails (`error`)."""

    def __init__(self, num_bytes: int, error: str | None = None, land: threading.Event | None = None) -> None:
        self.num_bytes = num_bytes
        self.error = error
        self.land = land

    def state(self) -> str:
        if self.error is not None:
            return "ERR"
        return "DONE" if self.land is None or self.land.is_set() else "PROC"

    def release(self) -> None:
        pass


class _Agent:
    """Records the WRITEs posted and the notifications sent (NIXL hands push_done over with the WRITE)."""

    def __init__(self, error: str | None = None, land: threading.Event | None = None) -> None:
        self.error = error
        self.land = land
        self.writes = 0
        self.sent: list[bytes] = []

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> _Write:
        self.writes += 1
        if self.error is None:
            self.sent.append(notif)
        return _Write(sum(n for _, n in local), self.error, self.land)

    def notify(self, peer: str, message: bytes) -> None:
        self.sent.append(message)

    def outcomes(self) -> list[tuple[str, str]]:
        """(push_done | push_failed, nonce) per notification sent."""
        notes = [parse_notification(n) for n in self.sent]
        assert all(isinstance(n, PushDone | PushFailed) for n in notes), notes
        return [(n.kind, n.nonce) for n in cast(list[PushDone | PushFailed], notes)]


class _Prefill:
    """The prefill's side channel and sender pool around one HoldTable holding request p-1: `on_push` is
    PrefillSide._on_push, whose accepted pushes queue here until `run` gives them to a PushSender."""

    def __init__(self, agent: _Agent | None = None, deadline_in: float = WAIT_S) -> None:
        self.spec: KVCacheSpec = make_spec()
        self.holds = HoldTable(lease_seconds=LEASE_S)
        self.holds.hold("p-1", [[3, 4, 5, 6]])
        self.agent = agent or _Agent()
        self.deadline_in = deadline_in
        self.queued: list[tuple[Hold, PushRequest, float]] = []
        self.submit_fails = False
        self.kv = SimpleNamespace(transfer_timeout_seconds=WAIT_S)
        self.decodes = SimpleNamespace(peer=lambda name, metadata, engine_id: "decode-agent")
        self.pusher = self
        self.sender = PushSender(cast(Any, self.agent), self.holds, cast(Any, None), transfer_timeout=WAIT_S)
        self.sender.spec = self.spec

    def submit(self, hold: Hold, message: PushRequest, peer: str, received: float) -> None:
        if self.submit_fails:
            raise KVTransferError("the sender pool is shut down")
        self.queued.append((hold, message, received))

    def chunk(self, nonce: str, last: bool = True, start: int = 3) -> PushRequest:
        return PushRequest(type="push", reader="d", request_id="p-1", nonce=nonce, owner=LOAD, last=last,
                           agent_name="decode", agent_metadata="00", runs=[[(0, start, 2)]], base_addrs=[4096],
                           block_bytes=self.spec.block_bytes, deadline_in=self.deadline_in)

    def on_push(self, message: PushRequest) -> Empty:
        return PrefillSide._on_push(cast(PrefillSide, self), message)

    def run(self) -> None:
        """A sender thread runs the pushes queued so far."""
        queued, self.queued = self.queued, []
        for hold, message, received in queued:
            self.sender._push(hold, message, "decode-agent", received)

    def push(self, nonce: str, last: bool = True, start: int = 3) -> None:
        assert self.on_push(self.chunk(nonce, last, start)) == Empty()
        self.run()

    def cancel(self) -> CancelPushAnswer:
        return self.holds.cancel_push(CancelPushRequest(type="cancel_push", request_id="p-1", owner=LOAD))

    def freed_once(self, now: float | None = None) -> None:
        """The hold is reported at this poll, and by no later one (not even past its lease)."""
        now = time.monotonic() if now is None else now
        assert self.holds.poll(now) == {"p-1"}, "not freed when its push ended"
        assert len(self.holds) == 0
        for later in (now, now + LEASE_S / 2, now + 3 * LEASE_S):
            assert self.holds.poll(later) == set(), "reported again"

    def kept(self) -> None:
        assert self.holds.poll(time.monotonic()) == set(), "freed while a decode is at it"


def test_a_whole_push_frees_its_hold_once() -> None:
    p = _Prefill()
    p.push("000000000000000a")
    assert p.agent.outcomes() == [("push_done", "000000000000000a")]
    p.freed_once()


def test_a_staged_push_frees_its_hold_once_after_its_last_chunk() -> None:
    p = _Prefill()
    p.push("000000000000000a", last=False)
    p.kept()
    p.push("000000000000000b", last=False, start=4)
    p.kept()
    p.push("000000000000000c", last=True, start=5)
    assert [n for _, n in p.agent.outcomes()] == ["000000000000000a", "000000000000000b", "000000000000000c"]
    p.freed_once()


@pytest.mark.parametrize("when", ["queued", "written"])
def test_a_resent_push_writes_once_and_frees_the_hold_once(when: str) -> None:
    """The decode's side channel sends an accepted push again (the answer was lost): while it is queued, or after it
    landed and ended the hold; no second WRITE, and the hold is reported once."""
    p = _Prefill()
    message = p.chunk("000000000000000a")
    assert p.on_push(message) == Empty()
    if when == "written":
        p.run()
        assert p.on_push(message) == Empty()
    else:
        assert p.on_push(message) == Empty()
        assert len(p.queued) == 1
        p.run()
    assert p.agent.writes == 1
    assert p.holds.poll(time.monotonic()) == {"p-1"}
    assert p.on_push(message) == Empty() and p.queued == []  # a resend after the hold was freed
    assert p.holds.poll(time.monotonic()) == set()


def test_a_push_not_queued_then_cancelled_frees_the_hold() -> None:
    """The side channel claimed the push but could not queue it: the decode's request fails, its load drains and
    cancels (table.py): the hold ends at once."""
    p = _Prefill()
    p.submit_fails = True
    with pytest.raises(KVTransferError, match="shut down"):
        p.on_push(p.chunk("000000000000000a"))
    p.kept()
    assert p.cancel() == CancelPushAnswer(in_flight=False)
    p.freed_once()


def test_a_push_not_queued_then_sent_again_lands_and_frees_the_hold_once() -> None:
    p = _Prefill()
    p.submit_fails = True
    with pytest.raises(KVTransferError, match="shut down"):
        p.on_push(p.chunk("000000000000000a"))
    p.submit_fails = False
    p.push("000000000000000a")  # the connection reset before the error came: the decode sent it again
    assert p.agent.outcomes() == [("push_done", "000000000000000a")]
    p.freed_once()


def test_a_push_the_prefill_could_not_queue_leaves_a_read_hold_to_the_decodes_cancel() -> None:
    """Decode B's push was claimed but not queued, and decode A READ the blocks meanwhile: B's cancel (its load
    fails and drains) ends the hold at once."""
    p = _Prefill()
    p.submit_fails = True
    with pytest.raises(KVTransferError, match="shut down"):
        p.on_push(p.chunk("000000000000000a"))
    p.holds.on_read_done(ReadDone(load="load-0", kind="read_done", request_id="p-1", reader=READER))
    p.kept()
    p.cancel()
    p.freed_once()


def test_a_push_refused_while_another_is_sent_then_cancelled_frees_the_hold() -> None:
    """A push that never got its claim (another send of the request held it past the wait): nothing of it stays,
    and the decode's cancel ends the hold once the other send ended."""
    p = _Prefill()
    other = p.holds.claim("p-1", [[3, 4]], p.spec.block_bytes, p.spec)  # a staging copy reads the blocks
    with pytest.raises(KVTransferError, match="already being sent"):
        p.holds.claim_push(p.chunk("000000000000000a"), p.spec, wait=0.0)
    assert p.cancel() == CancelPushAnswer(in_flight=False)
    p.kept()  # the staging copy still reads them
    p.holds.unclaim(other)
    p.freed_once()


def test_a_push_refused_as_late_frees_the_hold() -> None:
    """The sender thread ran the push after the decode's deadline: no WRITE, push_failed, and the hold ends."""
    p = _Prefill(deadline_in=0.0)
    p.push("000000000000000a")
    assert p.agent.writes == 0
    assert p.agent.outcomes() == [("push_failed", "000000000000000a")]
    p.freed_once()


@pytest.mark.parametrize("last", [True, False])
def test_a_push_whose_write_fails_frees_the_hold_once(last: bool) -> None:
    p = _Prefill(_Agent(error="injected WRITE error"))
    p.push("000000000000000a", last=last)
    assert p.agent.outcomes() == [("push_failed", "000000000000000a")]
    p.freed_once()
    with pytest.raises(KVTransferError, match="not held here any more"):
        p.on_push(p.chunk("000000000000000b", start=5))


@pytest.mark.parametrize("polled", [False, True])
def test_a_cancel_after_the_last_chunk_landed_reports_nothing_again(polled: bool) -> None:
    """The push landed whole, and its push_done was lost: the decode's load times out, drains and cancels, before
    or after the engine's poll saw the hold end."""
    p = _Prefill()
    p.push("000000000000000a")
    now = time.monotonic()
    if polled:
        p.freed_once(now)
    assert p.cancel() == CancelPushAnswer(in_flight=False)
    if not polled:
        p.freed_once(now)


def test_a_cancel_during_the_write_frees_the_hold_once_it_ended() -> None:
    """The decode cancels while the WRITE runs: told in_flight, it drains; the hold ends once the WRITE did."""
    land = threading.Event()
    p = _Prefill(_Agent(land=land))
    assert p.on_push(p.chunk("000000000000000a")) == Empty()
    sender = threading.Thread(target=p.run)
    sender.start()
    try:
        wait_for(lambda: p.agent.writes == 1, "the WRITE to be posted", WAIT_S, poll=0.005)
        assert p.cancel() == CancelPushAnswer(in_flight=True)
        p.kept()
    finally:
        land.set()
        sender.join(WAIT_S)
    assert not sender.is_alive()
    p.freed_once()


def test_a_cancel_between_chunks_frees_the_hold() -> None:
    p = _Prefill()
    p.push("000000000000000a", last=False)
    assert p.cancel() == CancelPushAnswer(in_flight=False)
    p.freed_once()
    with pytest.raises(KVTransferError, match="not held here any more|cancelled it before"):
        p.on_push(p.chunk("000000000000000b", start=5))


def test_a_decode_that_dies_between_chunks_leaves_the_hold_to_its_lease_once() -> None:
    p = _Prefill()
    p.push("000000000000000a", last=False)
    now = time.monotonic()
    assert p.holds.poll(now + LEASE_S / 2) == set()
    hold = p.holds.get("p-1")
    assert hold is not None
    p.freed_once(now + LEASE_S + 1.0)
    assert hold.expired
