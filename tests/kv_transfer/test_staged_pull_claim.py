"""A staged pull (the decode READs the prefill's staging slots, chunk after chunk) is a decode at the hold like the
others: each stage request names its reader and claims the hold for it, capped like a claim_read, and its
read_done/release after the last chunk ends its interest (prefill/hold.py `through`).

Before, it took no claim: between two of its chunks another decode's read_done, a push's last chunk or the proxy's
release ended the hold, the staged pull's next stage request was refused, and its decode computed the prompt
again. Driven through the decode's StagedLoad, whose side-channel requests reach a real StagingServer and
HoldTable; the other decode (it took the same hold: a proxy retried the decode leg there) ends after chunk 1.

A chunk's READ of the staging slots counts only when seen done before the load's deadline: the slots' ticket
ends a transfer timeout after the copy, which may be only milliseconds after that deadline, and then the slots
may hold another request's KV. A READ seen done after it used to count."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState, load_id
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.decode.staged import StagedLoad
from pdlaunch.kv_transfer.messages import ClaimReadRequest, Empty, StageRequest, UnstageRequest
from pdlaunch.kv_transfer.notifications import ReadDone, parse_notification
from pdlaunch.kv_transfer.prefill.holds import READ_GRACE_SECONDS, HoldTable
from pdlaunch.kv_transfer.prefill.push_sender import PushSender
from pdlaunch.kv_transfer.prefill.staging_server import StagingServer
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.side_channel.client import call
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
from pdlaunch.kv_transfer.staging import StagingArea
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import handshake_for
from tests.kv_transfer.push_fakes import LEASE_S, LandingAgent, held_table, push_chunk

WAIT_S = 30.0  # generous: every wait here ends by its event, never by this
READER_A = "decode-a-engine"  # pulls through the prefill's staging slots, two blocks a chunk
READER_B = "decode-b-engine"  # READs the blocks directly (claim_read)
LOAD_B = "bbbbbbbbbbbbbbbb"  # or pushes (the nonce of its load)


class _ReadingAgent:
    """The staged pull's NIXL agent: every READ completes at once (the second, with `late_load` set, as that load's
    deadline passes: its loader sees it done only after the deadline); records the notifications it sends."""

    name = "decode-a-agent"
    device_id = 0
    release_cancels = True

    def __init__(self) -> None:
        self.reads = 0
        self.sent: list[ReadDone] = []
        self.late_load: Load | None = None

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> Any:
        self.reads += 1
        return SimpleNamespace(state=self._state, release=lambda: None, num_bytes=sum(n for _, n in local),
                               error=None)

    def _state(self) -> str:
        if self.late_load is not None and self.reads == 2:
            self.late_load.deadline = min(self.late_load.deadline, time.monotonic() - 1.0)
        return "DONE"

    def notify(self, remote_agent: str, message: bytes) -> None:
        notif = parse_notification(message)
        assert isinstance(notif, ReadDone), notif
        self.sent.append(notif)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1)
    yield executor
    executor.shutdown(wait=True)


def _stager(spec: KVCacheSpec, holds: HoldTable, executor: ThreadPoolExecutor) -> StagingServer:
    """The prefill's staging server, with two slots: a staged pull of p-1's four blocks takes two chunks."""
    stager = StagingServer(holds, executor, transfer_timeout=WAIT_S)
    stager.spec, stager.staging = spec, StagingArea(spec.kv_caches, 2 * sum(spec.block_bytes))
    return stager


def _read_done(holds: HoldTable, reader: str) -> None:
    holds.on_read_done(ReadDone(kind="read_done", request_id="p-1", reader=reader, load="load-0"))


def _claim(holds: HoldTable, reader: str, load: str = "load-0") -> Empty:
    return holds.claim_read(ClaimReadRequest(type="claim_read", request_id="p-1", seconds=5.0, reader=reader,
                                             load=load))


def _staged_pull(spec: KVCacheSpec, stager: StagingServer, executor: ThreadPoolExecutor,
                 after_chunk_1: Callable[[], None], late: bool = False) -> tuple[_ReadingAgent, list[str]]:
    """Decode A's staged pull of p-1's blocks 3-6; `after_chunk_1` runs once its first chunk was unstaged. Returns
    its agent and the types of the side-channel requests it sent. late: its last READ is seen done only after
    the load's deadline (the load then fails)."""
    agent = _ReadingAgent()
    ctx = LoadContext(agent=cast(Any, agent), spec=lambda: spec, peers=cast(Any, None), keys=KEYS,
                      handshake_timeout=1.0, transfer_timeout=WAIT_S, verify_kv=False, executor=executor,
                      reader=READER_A)
    sent: list[str] = []

    def ask(remote: RemoteKV, message: Any, reply: type[Any], timeout: float, what: str) -> Any:
        sent.append(message.type)
        if isinstance(message, StageRequest):
            return stager.stage(message)
        assert isinstance(message, UnstageRequest), message
        answer = stager.unstage(message)
        if sent.count("unstage") == 1:
            after_chunk_1()
        return answer

    ctx.ask = ask  # type: ignore[method-assign]
    remote = RemoteEngine(handshake_for(spec, staging_slots=2), "prefill-agent", "pull", "test", ("10.0.0.9", 7000))
    now = time.monotonic()
    load = Load("r-1", RemoteKV(engine_id="P", request_id="p-1", host="10.0.0.9", port=7000,
                                block_ids=[[3, 4, 5, 6]]),
                [[(0, 10, 3), (1, 11, 4), (2, 12, 5), (3, 13, 6)]], deadline=now + WAIT_S, started=now,
                state=LoadState.RUNNING)
    if late:
        agent.late_load = load
        with pytest.raises(KVTransferError, match=r"did not arrive within 30s .*, stage: READ\)"):
            StagedLoad(ctx, remote).run(load)
        return agent, sent
    StagedLoad(ctx, remote).run(load)
    assert load.state == LoadState.OK and agent.reads == 2
    return agent, sent


@pytest.mark.parametrize("other", ["read_done", "push", "release"])
def test_a_staged_pull_between_its_chunks_keeps_the_hold_another_decode_ends(
        executor: ThreadPoolExecutor, other: str) -> None:
    """After decode A's first chunk, decode B reads the blocks and says so, or pushes them whole, or the proxy
    releases the hold (B's leg ended): A's second chunk is still staged, and the blocks are freed once, after A's
    read_done."""
    spec, holds = held_table()
    stager = _stager(spec, holds, executor)
    if other == "read_done":
        _claim(holds, READER_B)
    polls: list[set[str]] = []

    def other_ends() -> None:
        if other == "read_done":
            _read_done(holds, READER_B)
        elif other == "push":
            message = push_chunk(spec, LOAD_B, "00000000000000b1", last=True)
            hold = holds.claim_push(message, spec, wait=0.0)
            assert hold is not None
            sender = PushSender(cast(Any, LandingAgent()), holds, cast(Any, None), transfer_timeout=WAIT_S)
            sender.spec = spec
            sender._push(hold, message, "decode-b-agent", time.monotonic())
        else:
            assert not holds.release("p-1"), "released under decode A's staged pull"
        polls.append(holds.poll(time.monotonic()))

    agent, sent = _staged_pull(spec, stager, executor, other_ends)
    assert sent == ["stage", "unstage", "stage", "unstage"], "a staged pull's claim travels with its stages"
    assert polls == [set()], "freed under decode A's staged pull, between its chunks"
    [done] = agent.sent
    assert (done.kind, done.reader) == ("read_done", READER_A)
    holds.on_read_done(done)
    assert holds.poll(time.monotonic()) == {"p-1"}
    assert holds.poll(time.monotonic()) == set(), "freed once"
    assert _claim(holds, READER_A, load_id("r-1")) == Empty(), "A read the blocks while they were held"
    assert stager.users() == set() and stager.staging is not None
    assert stager.staging.num_free() == stager.staging.num_slots


def test_the_hold_of_a_staged_pull_whose_decode_died_ends_at_its_claims_cap(executor: ThreadPoolExecutor) -> None:
    """Decode A staged its first chunk and died: no read_done/release comes. Its claim keeps the blocks past the
    lease by at most the grace (its remaining time is clamped to the lease), and the hold is then freed as a
    claim's cap, not as a lease expiry."""
    spec, holds = held_table()
    stager = _stager(spec, holds, executor)
    now = time.monotonic()
    answer = stager.stage(StageRequest(type="stage", load="load-0", request_id="p-1", blocks=[[3, 4]], reader=READER_A,
                                       seconds=2 * LEASE_S))
    stager.unstage(UnstageRequest(type="unstage", ticket=answer.ticket))
    _read_done(holds, READER_B)  # another decode's end leaves the hold to A
    assert holds.poll(now + LEASE_S + 1.0) == set(), "freed at the lease under A's staged pull"
    hold = holds.get("p-1")
    assert hold is not None
    assert holds.poll(now + LEASE_S + READ_GRACE_SECONDS + WAIT_S) == {"p-1"}
    assert hold.unended_claims == [f"load load-0 of {READER_A}"] and not hold.expired


def test_a_chunk_read_seen_done_after_the_loads_deadline_does_not_count(executor: ThreadPoolExecutor) -> None:
    """Decode A's READ of its last chunk's slots completes as its load's deadline passes: the load fails (its
    release then ends its claim) rather than completing with slots whose ticket may have ended, and the slots
    are unstaged all the same."""
    spec, holds = held_table()
    stager = _stager(spec, holds, executor)
    agent, sent = _staged_pull(spec, stager, executor, lambda: None, late=True)
    assert agent.reads == 2 and not agent.sent, "a load whose last READ was seen done too late completed"
    assert sent == ["stage", "unstage", "stage", "unstage"]
    assert stager.users() == set() and stager.staging is not None
    assert stager.staging.num_free() == stager.staging.num_slots


def test_a_staging_copy_refused_for_its_blocks_claims_nothing(executor: ThreadPoolExecutor) -> None:
    """A stage request naming blocks the hold does not hold is refused, and its reader does not keep the hold."""
    spec, holds = held_table()
    stager = _stager(spec, holds, executor)
    with pytest.raises(KVTransferError, match="names blocks of group 0 it does not hold"):
        stager.stage(StageRequest(type="stage", load="load-0", request_id="p-1", blocks=[[7]], reader=READER_A,
                                  seconds=5.0))
    assert holds.release("p-1"), "the refused stage claimed the hold"
    assert holds.poll(time.monotonic()) == {"p-1"}


def test_a_stage_without_reader_is_refused_naming_the_fix() -> None:
    """An older decode's stage request names no reader: it could never end the claim it would take."""
    server = SideChannelServer("127.0.0.1", 0, {}, KEYS)
    refused = (r"invalid side-channel message: msg\.stage\.reader: .*reader \(the decode engine id\) is missing: "
               r"the decode runs an older pdlaunch; run the same pdlaunch version on prefill and decode")
    try:
        with pytest.raises(KVTransferError, match=refused):
            call("127.0.0.1", server.port, {"type": "stage", "request_id": "p-1", "blocks": [[3, 4]], "load": "l"}, 5,
                 "old decode", KEYS)
    finally:
        server.close()
