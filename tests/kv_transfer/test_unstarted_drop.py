"""A decode load that ends before its strategy was on it, after the prefill named the request's blocks for it, asks
each prefill rank that holds them to drop its hold (on the side channel, which needs no handshake), within a short
timeout of its own: the prefill's real hold table behind a real side channel, the decode's loader.
- vLLM's push proxy: the prefill named its blocks ("held_blocks") but the decode cannot plan them: "cancel_push";
- a resharding load failed by the test-only fault hook before its strategy ran: every rank it reads gets the
  "release" its strategy would send, naming how many decode ranks read that rank; with several (decode TP 2,
  prefill TP 1) it counts as this rank's word, so the hold ends at the other rank's read_done. Its cancel used to
  count as no rank's: the hold then waited for this rank until the other rank's READ claim's cap;
- a prefill that does not answer the cancel: logged (its lease frees the blocks), and the loader thread is back
  within the cancel's own short timeout, not the handshake timeout.
The handshake and planning failures through real instances: tests/serving/test_failed_handshake_release_e2e.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode.context import RELEASE_TIMEOUT_SECONDS, LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState
from pdlaunch.kv_transfer.decode.loads import DecodeLoads
from pdlaunch.kv_transfer.fault import ENV, TransferFaults
from pdlaunch.kv_transfer.messages import (
    CancelPushAnswer,
    CancelPushRequest,
    ClaimReadRequest,
    Empty,
    HeldBlocksRequest,
    ReleaseRequest,
)
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.side import PrefillSide
from pdlaunch.kv_transfer.push_params import prompt_digest
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.reshard import plan_reshard
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import make_spec, wait_releases_sent

WAIT_S = 60.0  # generous for a loaded 2-core machine; also the handshake timeout: far above the cancel's own
PROMPT = list(range(100, 120))
LOGGER = "pdlaunch.kv_transfer.decode.loads"


@dataclass
class _Rank:
    """One prefill rank: its hold table behind its side channel, and the cancels and releases that reached it."""

    holds: HoldTable
    server: SideChannelServer
    cancels: list[str]
    releases: list[ReleaseRequest]

    def released(self) -> list[tuple[str, str, int]]:
        return [(message.request_id, message.reader, message.readers) for message in self.releases]

    def freed(self, request_id: str) -> bool:
        """Poll the table as the prefill's engine thread does until it frees `request_id` (False after WAIT_S)."""
        until = time.monotonic() + WAIT_S
        while time.monotonic() < until:
            if request_id in self.holds.poll(time.monotonic()):
                return True
            time.sleep(0.01)
        return False


@pytest.fixture
def ranks() -> Iterator[Callable[[], _Rank]]:
    """Makes prefill ranks (60 s leases); each serves held_blocks (the prefill's real handler), cancel_push and
    release."""
    made: list[_Rank] = []

    def make() -> _Rank:
        holds = HoldTable(lease_seconds=WAIT_S)
        prefill = SimpleNamespace(holds=holds, kv=SimpleNamespace(transfer_timeout_seconds=WAIT_S), kv_epoch=0)
        cancels: list[str] = []
        releases: list[ReleaseRequest] = []

        def cancel_push(message: CancelPushRequest) -> CancelPushAnswer:
            cancels.append(message.owner)
            return holds.cancel_push(message)

        def release(message: ReleaseRequest) -> Empty:
            releases.append(message)
            return holds.on_release(message)

        def held_blocks(message: HeldBlocksRequest) -> Any:
            return PrefillSide._on_held_blocks(cast(Any, prefill), message)  # noqa: SLF001 - its real handler

        server = SideChannelServer("127.0.0.1", 0, {"cancel_push": cancel_push, "held_blocks": held_blocks,
                                                    "release": release}, KEYS)
        made.append(_Rank(holds, server, cancels, releases))
        return made[-1]

    try:
        yield make
    finally:
        for rank in made:
            rank.server.shutdown()
            rank.server.server_close()


@pytest.fixture
def loads() -> Iterator[DecodeLoads]:
    """The decode's loads of a TP-1 engine; peers are never asked (no handshake before these loads end)."""
    with ExitStack() as stack:
        executor = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        ctx = LoadContext(agent=cast(Any, None), spec=lambda: make_spec(), peers=cast(Any, None), keys=KEYS,
                          handshake_timeout=WAIT_S, transfer_timeout=WAIT_S, verify_kv=False, executor=executor,
                          reader="decode")
        stack.callback(ctx.connections.close)
        stack.callback(ctx.releases.shutdown)
        yield DecodeLoads(ctx)


def _load(remote: RemoteKV, request_id: str = "r-1") -> Load:
    now = time.monotonic()
    return Load(request_id, remote, [[(0, 10, 3)]], deadline=now + WAIT_S, started=now)


def test_a_push_proxy_load_that_cannot_plan_the_named_blocks_lets_the_prefill_free(
        ranks: Callable[[], _Rank], loads: DecodeLoads) -> None:
    prefill = ranks()
    prefill.holds.hold("client-1-ffff0000", [[4, 5]], prompt_digest(PROMPT))
    # The client's X-Request-Id "client-1" names it (push_params.client_request_id).
    load = _load(RemoteKV(engine_id="P", request_id=None, host="127.0.0.1", port=prefill.server.port),
                 "client-1-0a1b2c3d")
    load.pairs, load.prompt_digest = [], prompt_digest(PROMPT)

    def unplannable(remote: RemoteKV) -> list[list[tuple[int, int, int]]]:
        raise KVTransferError("prefill sent block ids of 1 KV-cache groups, this engine has 2")

    load.plan = unplannable
    loads.run(load)
    wait_releases_sent(loads.ctx.releases, WAIT_S)  # its release goes on a release thread
    assert load.state == LoadState.FAILED and "KV-cache groups" in (load.error or "")
    assert prefill.cancels == [load.nonce]
    assert prefill.freed("client-1-ffff0000")


def test_a_resharding_load_failed_before_its_strategy_ran_lets_every_rank_it_reads_free(
        ranks: Callable[[], _Rank], loads: DecodeLoads) -> None:
    """Prefill TP 2, decode TP 1: both prefill ranks hold the request; the test-only fault hook fails the load before
    its strategy (which tells each rank itself once it runs) took it over."""
    rank0, rank1 = ranks(), ranks()
    for rank in (rank0, rank1):
        rank.holds.hold("p-1", [[3]])
    spec = make_spec(groups=2)
    remote = RemoteKV(engine_id="P", request_id="p-1", host="127.0.0.1", port=rank0.server.port,
                      block_ids=[[3], [3]], tp_size=2, kv_heads_per_rank=spec.num_kv_heads // 2,
                      rank_ports=[rank0.server.port, rank1.server.port])
    load = _load(remote)
    load.reshard = plan_reshard(remote, spec.tp_rank, spec.tp_size, spec.num_kv_heads)
    loads.faults = TransferFaults({ENV: "1"})
    loads.run(load)  # peers is None here: a handshake would raise AttributeError, not the injected fault
    wait_releases_sent(loads.ctx.releases, WAIT_S)  # its release goes on a release thread
    assert load.state == LoadState.FAILED and ENV in (load.error or "")
    assert rank0.cancels == rank1.cancels == []
    assert rank0.released() == rank1.released() == [("p-1", "decode", 1)]  # decode TP 1: the one reader of each
    assert rank0.freed("p-1") and rank1.freed("p-1")


@pytest.mark.parametrize("claimed_first", [True, False], ids=["claimed-first", "claimed-after"])
def test_a_resharding_load_failed_before_its_strategy_ran_counts_as_one_of_the_ranks_reading_a_hold(
        ranks: Callable[[], _Rank], loads: DecodeLoads, claimed_first: bool) -> None:
    """Prefill TP 1, decode TP 2: both decode ranks read the prefill's one hold, which waits for one word from each.
    Rank 0's load fails before its strategy ran (the test-only fault hook); rank 1 claims the hold for its READ,
    before or after rank 0's word, and its read_done then ends the hold at once: rank 0's word counted as its rank's
    (a cancel counted as none, and the hold lived on to rank 1's claim's cap, 65 s here; or, sent before the claim,
    freed the blocks under rank 1's load, whose claim then failed)."""
    prefill = ranks()
    prefill.holds.hold("p-1", [[3]])
    remote = RemoteKV(engine_id="P", request_id="p-1", host="127.0.0.1", port=prefill.server.port,
                      block_ids=[[3]], tp_size=1, kv_heads_per_rank=2)
    load = _load(remote)
    load.reshard = plan_reshard(remote, 0, 2, 1)  # decode rank 0 of TP 2, one KV head per rank
    assert [source.readers for source in load.reshard.sources] == [2]
    # Rank 1 runs the same engine request: its load has rank 0's load id (a digest of that request id).
    rank1_claim = ClaimReadRequest(type="claim_read", load=load.load_id, request_id="p-1", seconds=WAIT_S,
                                   reader="decode")
    if claimed_first:
        prefill.holds.claim_read(rank1_claim)
    loads.faults = TransferFaults({ENV: "1"})
    loads.run(load)
    wait_releases_sent(loads.ctx.releases, WAIT_S)  # its release goes on a release thread
    assert load.state == LoadState.FAILED and ENV in (load.error or "")
    assert prefill.cancels == [] and prefill.released() == [("p-1", "decode", 2)]
    if not claimed_first:
        prefill.holds.claim_read(rank1_claim)  # raises when rank 0's word freed the blocks
    assert prefill.holds.poll(time.monotonic()) == set(), "freed while decode rank 1 READs"
    prefill.holds.on_read_done(ReadDone(kind="read_done", request_id="p-1", reader="decode", load=load.load_id,
                                        readers=2))
    assert prefill.holds.poll(time.monotonic()) == {"p-1"}


def test_a_prefill_that_does_not_answer_the_cancel_is_logged_and_not_waited_for_long(
        ranks: Callable[[], _Rank], loads: DecodeLoads, caplog: pytest.LogCaptureFixture) -> None:
    prefill = ranks()
    prefill.holds.hold("p-1", [[3]])
    answer = threading.Event()

    def stalled(message: CancelPushRequest) -> CancelPushAnswer:
        assert answer.wait(WAIT_S), "the test never let the cancel answer"
        return CancelPushAnswer(in_flight=False)

    prefill.server.handlers["cancel_push"] = stalled
    load = _load(RemoteKV(engine_id="P", request_id="p-1", host="127.0.0.1", port=prefill.server.port,
                          block_ids=[[3]]))
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            loads.drop_unstarted(load)
        took = time.monotonic() - started
    finally:
        answer.set()
    assert RELEASE_TIMEOUT_SECONDS <= took < WAIT_S / 2, f"the cancel waited {took:.1f}s (handshakes: {WAIT_S:g}s)"
    [line] = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert line.startswith("request r-1: kv_transfer.handshake_timeout_seconds: hold release to prefill engine P")
    assert "the prefill keeps the request's blocks until its hold's lease ends" in line
    assert prefill.holds.get("p-1") is not None  # its lease, 60 s here, frees it


def test_a_request_id_the_prefill_never_confirmed_is_not_cancelled(ranks: Callable[[], _Rank],
                                                                  loads: DecodeLoads) -> None:
    """vLLM push-proxy params name a request id but no blocks: until "held_blocks" names the blocks for this
    prompt, the id is the client's word; a request held for another prompt is not this load's to free."""
    prefill = ranks()
    prefill.holds.hold("p-1", [[3]])
    loads.drop_unstarted(_load(RemoteKV(engine_id="P", request_id="p-1", host="127.0.0.1",
                                        port=prefill.server.port)))
    assert prefill.cancels == [] and prefill.holds.get("p-1") is not None
