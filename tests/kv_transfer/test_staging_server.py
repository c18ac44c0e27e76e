"""The prefill's staging server: a stage request that times out leaves no claim, slot or ticket behind, and a
copy it queued never reads blocks that are no longer held."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.messages import StageRequest
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
            stager.stage(StageRequest(type="stage", request_id="r1", blocks=[[3, 4]]))
        hold = holds.get("r1")
        assert hold is not None and hold.busy == 0  # the decode gave up: the hold is not pinned by the copy
        holds.release("r1")
        assert holds.poll(0.0) == {"r1"}  # freed: an engine reuses blocks 3 and 4 now
        blocker.set()
        busy.result(WAIT_S)
        executor.shutdown(wait=True)
        assert not gathered, "the queued copy read blocks of a request no longer held"
        assert stager.users() == set() and stager.staging.num_free() == stager.staging.num_slots
    finally:
        blocker.set()
        executor.shutdown(wait=True)
