"""The prefill's staging server: a stage request that times out leaves no claim, slot or ticket behind, and a
copy it queued never reads blocks that are no longer held."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.messages import StageAnswer, StageRequest, UnstageRequest
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.staging_server import StagingServer
from pdlaunch.kv_transfer.staging import StagingArea
from tests.kv_transfer.pd_procs import make_spec

WAIT_S = 30.0


def test_a_stage_that_times_out_in_the_queue_is_dropped_with_its_claim() -> None:
    spec = make_spec(num_blocks=8)
    holds = HoldTable(lease_seconds=60.0)
    holds.hold("r1", [[3, 4]])
    executor = ThreadPoolExecutor(max_workers=1)
    blocker = threading.Event()
    busy = executor.submit(blocker.wait, WAIT_S)  # the only sender thread is pushing another request
    stager = StagingServer(holds, executor, transfer_timeout=0.2)
    stager.spec, stager.staging = spec, StagingArea(spec.kv_caches, 4 * sum(spec.block_bytes))
    gathered: list[list[list[int]]] = []
    gather = stager.staging.gather

    def recording_gather(kv_caches: list[torch.Tensor], blocks: list[list[int]], slots: list[int]) -> None:
        gathered.append(blocks)
        gather(kv_caches, blocks, slots)

    stager.staging.gather = recording_gather  # type: ignore[method-assign]
    try:
        with pytest.raises(KVTransferError, match=r"staging 2 blocks of request r1 did not finish within 0\.2s"):
            stager.stage(StageRequest(type="stage", load="load-0", request_id="r1", blocks=[[3, 4]], reader="decode",
                                      seconds=0.2))
        hold = holds.get("r1")
        assert hold is not None and hold.busy == 0  # the decode gave up: the hold is not pinned by the copy
        holds.on_read_done(ReadDone(load="load-0", kind="release", request_id="r1",
                                    reader="decode"))  # which ends its claim
        assert holds.poll(0.0) == {"r1"}  # freed: an engine reuses blocks 3 and 4 now
        blocker.set()
        busy.result(WAIT_S)
        executor.shutdown(wait=True)
        assert not gathered, "the queued copy read blocks of a request no longer held"
        assert stager.users() == set() and stager.staging.num_free() == stager.staging.num_slots
    finally:
        blocker.set()
        executor.shutdown(wait=True)


def _stager(holds: HoldTable, executor: ThreadPoolExecutor) -> StagingServer:
    spec = make_spec(num_blocks=8)
    stager = StagingServer(holds, executor, transfer_timeout=WAIT_S)
    stager.spec, stager.staging = spec, StagingArea(spec.kv_caches, 4 * sum(spec.block_bytes))
    return stager


def _stage(nonce: str = "5e9d0c4b7a3f1e26") -> StageRequest:
    return StageRequest(type="stage", load="load-0", request_id="r1", blocks=[[3, 4]], nonce=nonce, reader="decode",
                        seconds=WAIT_S)


def test_a_stage_sent_again_while_its_first_copy_runs_gets_that_copys_answer() -> None:
    """Decode's side channel sends a request again when the connection resets before the answer: the
    resend must not stage a second copy whose slots nobody unstages until its ticket deadline."""
    holds = HoldTable(lease_seconds=60.0)
    holds.hold("r1", [[3, 4]])
    executor = ThreadPoolExecutor(max_workers=2)
    stager = _stager(holds, executor)
    assert stager.staging is not None
    copying, go_on = threading.Event(), threading.Event()
    gather = stager.staging.gather

    def slow_gather(kv_caches: list[torch.Tensor], blocks: list[list[int]], slots: list[int]) -> None:
        copying.set()
        assert go_on.wait(WAIT_S)
        gather(kv_caches, blocks, slots)

    stager.staging.gather = slow_gather  # type: ignore[method-assign]
    answers: list[StageAnswer] = []
    first = threading.Thread(target=lambda: answers.append(stager.stage(_stage())))
    try:
        first.start()
        assert copying.wait(WAIT_S)
        resend = threading.Thread(target=lambda: answers.append(stager.stage(_stage())))
        resend.start()
        go_on.set()
        first.join(WAIT_S)
        resend.join(WAIT_S)
        assert len(answers) == 2 and answers[0] == answers[1]
        assert stager.staging.num_free() == stager.staging.num_slots - 2, "the resend took slots of its own"
        hold = holds.get("r1")
        assert hold is not None and hold.busy == 0
        stager.unstage(UnstageRequest(type="unstage", ticket=answers[0].ticket))
        assert stager.staging.num_free() == stager.staging.num_slots and stager.users() == set()
    finally:
        go_on.set()
        executor.shutdown(wait=True)


def test_a_stage_sent_again_after_its_first_copy_is_answered_alike_or_refused() -> None:
    holds = HoldTable(lease_seconds=60.0)
    holds.hold("r1", [[3, 4]])
    executor = ThreadPoolExecutor(max_workers=1)
    stager = _stager(holds, executor)
    assert stager.staging is not None
    try:
        answer = stager.stage(_stage())
        assert stager.stage(_stage()) == answer
        assert stager.staging.num_free() == stager.staging.num_slots - 2
        other = stager.stage(_stage("0000000000000002"))  # another request's copy is no resend
        assert other.ticket != answer.ticket
        stager.unstage(UnstageRequest(type="unstage", ticket=other.ticket))
        stager.unstage(UnstageRequest(type="unstage", ticket=answer.ticket))
        with pytest.raises(KVTransferError, match="sent again after its slots were released"):
            stager.stage(_stage())  # its slots may hold another request's KV now
        assert stager.staging.num_free() == stager.staging.num_slots and stager.users() == set()
    finally:
        executor.shutdown(wait=True)


def test_a_stage_whose_first_copy_failed_is_served_when_sent_again() -> None:
    holds = HoldTable(lease_seconds=60.0)
    executor = ThreadPoolExecutor(max_workers=1)
    stager = _stager(holds, executor)
    assert stager.staging is not None
    try:
        with pytest.raises(KVTransferError, match="not held"):
            stager.stage(_stage())
        holds.hold("r1", [[3, 4]])
        answer = stager.stage(_stage())
        assert len(answer.slots[0]) == 2
        assert stager.users() == {"r1"}
    finally:
        executor.shutdown(wait=True)
