"""A load from the CPU offload tier that cannot be queued after the request's device blocks were
allocated: the request ends with an error naming the CPU tier and its blocks go back to the free list
(they leaked, and the error ended the whole step); the other requests of the step go on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pdlaunch.engine.request import RequestStatus
from pdlaunch.engine.scheduler import Scheduler
from pdlaunch.errors import EngineError
from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.offload.cpu_tier import CPUTier
from pdlaunch.offload.manager import OffloadManager
from pdlaunch.offload.transfer import TransferSpec
from tests.engine.test_scheduler import BS, FakeConnector, drain, req, step

SHAPE = (1, 2, BS, 1, 2)  # one device block: [layers, 2, block_size, kv_heads, head_dim]
NUM_BLOCKS = 16
BASE = 500  # the prompt whose first two blocks the CPU tier holds


@pytest.fixture
def offload() -> Iterator[OffloadManager]:
    bm = BlockManager(NUM_BLOCKS, BS)
    caches = [torch.zeros(NUM_BLOCKS, *SHAPE)]
    manager = OffloadManager(bm, lambda: caches, 4 * CPUTier.bytes_per_block([SHAPE], torch.float32) / 2**30)
    parent: int | None = None
    for j in range(2):
        tokens = tuple(range(BASE + j * BS, BASE + (j + 1) * BS))
        block_hash = bm.index.hash_fn(parent, tokens)
        assert manager.tier.allocate(block_hash, parent, tokens, frozenset({0})) is not None
        parent = block_hash
    yield manager
    manager.shutdown()


def _rejected(job_id: int, spec: TransferSpec) -> bool:
    raise EngineError("group 0: a block id is out of range", field="offload.spec")


@pytest.mark.parametrize("connector", [None, FakeConnector()], ids=["local", "connector"])
def test_a_cpu_load_that_cannot_be_queued_fails_its_request_and_frees_its_blocks(
        offload: OffloadManager, connector: FakeConnector | None, monkeypatch: pytest.MonkeyPatch) -> None:
    bm = offload.block_manager
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, connector=connector, offload=offload)
    hit = req("hit", 3 * BS, base=BASE)
    other = req("other", 2 * BS)
    s.add_request(hit)
    s.add_request(other)
    monkeypatch.setattr(offload.transfer, "transfer_async", _rejected)
    out = step(s)  # checks the block manager's integrity
    assert [x.request.request_id for x in out.scheduled] == ["other"]
    assert s.take_failed() == [hit]
    assert hit.status == RequestStatus.FINISHED and hit.finish_reason == "error" and hit.error_status == 500
    assert "CPU offload tier" in (hit.error or "") and "out of range" in (hit.error or "")
    assert not bm.has_blocks("hit") and bm.num_used_blocks() == len(bm.block_ids("other")[0])
    offload.check_integrity()
    if connector is not None:
        assert connector.aborted == ["hit"] and connector.loads == []
    monkeypatch.undo()
    drain(s)
    assert bm.num_used_blocks() == 0 and offload.hit_blocks == 0
    bm.check_integrity()
