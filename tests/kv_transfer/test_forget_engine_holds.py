"""A decode engine that died is done with the prefill's holds once its launcher tells the prefill to forget it
(PrefillSide.forget_engine): its pushes queued are dropped, a WRITE of its still running stops, its READ claims and
staged pulls end and their staging slots go back, and a hold only it was at is freed at the next poll, exactly once.
Before, such a hold kept its blocks until its lease (a push between its chunks) or its claim's cap (a claimed READ
or staged pull), although the prefill had been told the decode was gone.

A hold another decode is at stays for it (the proxy retried the decode leg there, with the same params), and so does
a hold no decode took yet (the proxy may still send its decode leg to a live decode). Driven through
PrefillSide.forget_engine and _on_push around a real HoldTable, PushSender (one sender thread), StagingServer and
DecodePeers; only the transfer agent is a fake."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.messages import ClaimReadRequest, Empty, StageAnswer, StageRequest, UnstageRequest
from pdlaunch.kv_transfer.notifications import ReadDone, parse_notification
from pdlaunch.kv_transfer.prefill.decode_peers import DecodePeers
from pdlaunch.kv_transfer.prefill.push_sender import PushSender
from pdlaunch.kv_transfer.prefill.side import PrefillSide
from pdlaunch.kv_transfer.prefill.staging_server import StagingServer
from pdlaunch.kv_transfer.staging import StagingArea
from pdlaunch.metrics.kv_transfer import KV_DEAD_READER_FREES
from tests.kv_transfer.push_fakes import LEASE_S, held_table, push_chunk
from tests.serving.helpers import wait_for

WAIT_S = 30.0  # generous: every wait below ends on its condition well before this
D0, D1, D2 = "decode-0-engine", "decode-1-engine", "decode-2-engine"  # D0 dies; D1 took the same hold
LOADS = {D0: "000000000000d000", D1: "000000000000d111"}  # each decode's load (PushRequest.owner)


class _Write:
    def __init__(self, agent: _Agent, num_bytes: int) -> None:
        self.agent = agent
        self.num_bytes = num_bytes
        self.error = None

    def state(self) -> str:
        return "DONE" if self.agent.land.is_set() else "PROC"

    def release(self) -> None:
        self.agent.released += 1


class _Agent:
    """WRITEs land once `land` is set (at once by default); records the WRITEs, their releases and the
    notifications sent (NIXL hands push_done over with the WRITE), and loads any decode agent."""

    def __init__(self, land: bool = True) -> None:
        self.land = threading.Event()
        if land:
            self.land.set()
        self.writes = 0
        self.released = 0
        self.sent: list[tuple[str, str]] = []  # (peer, notification kind)

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> _Write:
        self.writes += 1
        self.notify(remote_agent, notif)
        return _Write(self, sum(n for _, n in local))

    def notify(self, peer: str, message: bytes) -> None:
        self.sent.append((peer, parse_notification(message).kind))

    def add_remote(self, metadata: bytes) -> str:
        return f"loaded-{metadata.hex()}"

    def forget_remote(self, name: str) -> None:
        pass


class _Prefill:
    """What PrefillSide.forget_engine and _on_push use, around a table holding request p-1's blocks 3-6; a sender
    pool of one thread; two staging slots."""

    def __init__(self, executor: ThreadPoolExecutor, agent: _Agent, transfer_timeout: float = WAIT_S) -> None:
        self.spec, self.holds = held_table()
        self.agent = agent
        self.kv = SimpleNamespace(transfer_timeout_seconds=transfer_timeout)
        self.pusher = PushSender(cast(Any, agent), self.holds, executor, transfer_timeout)
        self.stager = StagingServer(self.holds, executor, WAIT_S)
        self.pusher.spec = self.stager.spec = self.spec
        self.stager.staging = StagingArea(self.spec.kv_caches, 2 * sum(self.spec.block_bytes))
        self.decodes = DecodePeers(cast(Any, agent))

    def forget(self, engine_id: str) -> int:
        return PrefillSide.forget_engine(cast(PrefillSide, self), engine_id)

    def push(self, reader: str, nonce: str, last: bool, start: int = 3) -> Empty:
        message = push_chunk(self.spec, LOADS[reader], nonce, last, start, reader)
        message = message.model_copy(update={"agent_name": f"{reader}-agent", "agent_metadata": reader.encode().hex(),
                                              "deadline_in": self.kv.transfer_timeout_seconds})
        return PrefillSide._on_push(cast(PrefillSide, self), message)

    def pushed(self, reader: str, nonce: str, last: bool, start: int = 3) -> None:
        """A push chunk that the sender thread WROTE (its claim of the hold ended)."""
        assert self.push(reader, nonce, last, start) == Empty()
        hold = self.holds.get("p-1")
        wait_for(lambda: hold is None or not hold.busy, "the push to be sent", WAIT_S, poll=0.005)

    def claim(self, reader: str) -> Empty:
        return self.holds.claim_read(ClaimReadRequest(type="claim_read", load="load-0", request_id="p-1", seconds=5.0,
                                                      reader=reader))

    def stage(self, reader: str) -> StageAnswer:
        return self.stager.stage(StageRequest(type="stage", load="load-0", request_id="p-1", blocks=[[3, 4]],
                                              reader=reader,
                                              seconds=WAIT_S))

    def notify(self, reader: str, kind: str = "read_done", readers: int = 1) -> None:
        self.holds.on_read_done(ReadDone(load="load-0", kind=kind, request_id="p-1", reader=reader, readers=readers))

    def kept(self) -> None:
        assert self.holds.poll(time.monotonic()) == set(), "freed while a live decode is at it"
        assert len(self.holds) == 1

    def freed_once(self) -> None:
        """The hold is reported at this poll, and by no later one (within the lease: the table remembers how it
        ended, and that D0 ended, that long)."""
        now = time.monotonic()
        assert self.holds.poll(now) == {"p-1"}, "not freed although the decode at it ended"
        for later in (now, now + LEASE_S / 2):
            assert self.holds.poll(later) == set(), "reported again"

    def slots_free(self) -> bool:
        staging = self.stager.staging
        return staging is not None and staging.num_free() == staging.num_slots


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1)  # the prefill's sender pool: one thread
    yield executor
    executor.shutdown(wait=True)


def test_a_staged_push_whose_decode_died_between_chunks_is_freed_when_told(
        executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture) -> None:
    p = _Prefill(executor, _Agent())
    p.pushed(D0, "000000000000000a", last=False)
    p.kept()
    freed = KV_DEAD_READER_FREES._value.get()
    with caplog.at_level(logging.INFO, logger="pdlaunch.kv_transfer.prefill.side"):
        assert p.forget(D0) == 1  # its agent
    assert "decode engine decode-0-engine ended: of the 1 held request(s) it was at, 1 freed" in caplog.text
    assert KV_DEAD_READER_FREES._value.get() == freed + 1
    p.freed_once()
    with pytest.raises(KVTransferError, match="not held here any more: the decode engine that took it ended: "
                                              "decode-0-engine"):
        p.claim(D1)
    assert [kind for _, kind in p.agent.sent] == ["push_done"]


def test_a_push_queued_for_a_decode_that_died_is_dropped(executor: ThreadPoolExecutor) -> None:
    p = _Prefill(executor, _Agent())
    busy = threading.Event()
    executor.submit(busy.wait, WAIT_S)  # the sender thread is busy with another transfer
    try:
        assert p.push(D0, "000000000000000a", last=True) == Empty()
        p.kept()
        p.forget(D0)
        p.freed_once()
    finally:
        busy.set()
    executor.submit(lambda: None).result(WAIT_S)  # the sender thread ran whatever was queued behind it
    assert (p.agent.writes, p.agent.sent) == (0, []), "the dropped push ran"


def test_a_write_to_a_decode_that_died_stops_and_frees_the_hold(executor: ThreadPoolExecutor) -> None:
    """The WRITE never ends by itself within the test (decode's deadline is far): forgetting its decode stops the
    sender's wait, releases the WRITE, and sends no push_failed to the dead decode."""
    agent = _Agent(land=False)
    p = _Prefill(executor, agent, transfer_timeout=4 * WAIT_S)
    try:
        assert p.push(D0, "000000000000000a", last=True) == Empty()
        wait_for(lambda: agent.writes == 1, "the WRITE to be posted", WAIT_S, poll=0.005)
        p.kept()
        p.forget(D0)
        assert wait_for(lambda: p.holds.poll(time.monotonic()), "the hold to be freed", WAIT_S, poll=0.01) == {"p-1"}
        assert agent.released == 1
        assert p.holds.poll(time.monotonic() + LEASE_S / 2) == set(), "reported again"
    finally:
        agent.land.set()
    executor.submit(lambda: None).result(WAIT_S)
    assert [kind for _, kind in agent.sent] == ["push_done"], "a push_failed went to the dead decode"


@pytest.mark.parametrize("how", ["claim_read", "staged_pull", "reshard_half_notified", "released_by_proxy"])
def test_a_read_of_a_decode_that_died_ends_when_told(executor: ThreadPoolExecutor, how: str) -> None:
    p = _Prefill(executor, _Agent())
    if how == "staged_pull":
        p.stage(D0)  # its ticket's slots are never unstaged
        assert not p.slots_free()
    elif how == "reshard_half_notified":
        p.claim(D0)
        p.notify(D0, "release", readers=2)  # one of its two ranks gave up; the other died with it
    else:
        p.claim(D0)
    if how == "released_by_proxy":
        assert not p.holds.release("p-1"), "released under a claimed READ"
    p.kept()
    p.forget(D0)
    assert p.slots_free()
    p.freed_once()
    with pytest.raises(KVTransferError, match="not held here any more"):
        p.claim(D0)  # its claim was on its way as it died


@pytest.mark.parametrize("other", ["claim_read", "push", "staged_pull"])
def test_a_hold_another_decode_is_at_stays_for_it(executor: ThreadPoolExecutor, other: str) -> None:
    """D0 pushed a first chunk and died; the proxy retried its decode leg on D1, which took the same hold."""
    p = _Prefill(executor, _Agent())
    p.pushed(D0, "000000000000000a", last=False)
    if other == "claim_read":
        p.claim(D1)
    elif other == "push":
        p.pushed(D1, "000000000000001a", last=False)
    else:
        ticket = p.stage(D1).ticket
    freed = KV_DEAD_READER_FREES._value.get()
    p.forget(D0)
    p.kept()
    assert KV_DEAD_READER_FREES._value.get() == freed  # kept for D1: not freed by D0's end
    for late in (lambda: p.push(D0, "000000000000000b", last=True, start=5), lambda: p.claim(D0),
                 lambda: p.stage(D0)):  # what it sent as it died takes the hold no more
        with pytest.raises(KVTransferError, match="decode engine decode-0-engine ended"):
            late()
    p.kept()
    if other == "claim_read":
        p.notify(D1)
    elif other == "push":
        p.pushed(D1, "000000000000001b", last=True, start=5)
    else:
        assert p.stager.users() == {"p-1"}, "D1's staging slots went with D0"
        p.stager.unstage(UnstageRequest(type="unstage", ticket=ticket))
        p.notify(D1)
    p.freed_once()
    if other != "push":
        with pytest.raises(KVTransferError, match=r"read by another load of its params \(load load-0 of decode-1-eng"):
            p.claim(D2)


def test_a_hold_no_decode_took_stays_when_a_decode_dies(executor: ThreadPoolExecutor) -> None:
    p = _Prefill(executor, _Agent())
    assert p.forget(D0) == 0
    p.kept()
    assert p.claim(D1) == Empty()  # the proxy's decode leg went to a live decode
    p.notify(D1)
    p.freed_once()
