"""A store to the CPU tier that fails: a load matched to its block before the failure was polled must
not read what the failed copy left there (a miss: the prompt is computed), and the tier's block
accounting stays consistent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.offload.cpu_tier import CPUTier
from pdlaunch.offload.manager import OffloadManager

BLOCK_SIZE = 4
SHAPE = (1, 2, BLOCK_SIZE, 1, 2)  # one device block: [layers, 2, block_size, kv_heads, head_dim]
PROMPT = [11, 12, 13, 14]


@pytest.fixture
def setup() -> Iterator[tuple[BlockManager, OffloadManager, list[torch.Tensor]]]:
    bm = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    caches = [torch.arange(2 * 16, dtype=torch.float32).reshape(2, *SHAPE)]
    gb = 4 * CPUTier.bytes_per_block([SHAPE], torch.float32) / 2**30
    manager = OffloadManager(bm, lambda: caches, gb)
    yield bm, manager, caches
    manager.shutdown()


def _evict_prompt(bm: BlockManager, manager: OffloadManager, fail: bool) -> torch.Tensor:
    """Cache PROMPT's block, reuse it for another request (an eviction), queue its store; returns its KV."""
    assert bm.allocate("a", BLOCK_SIZE, 0)
    kv = manager.gpu_caches()[0][bm.block_ids("a")[0][0]].clone()
    bm.cache_blocks("a", PROMPT, BLOCK_SIZE)
    bm.free("a")
    assert bm.allocate("b", 2 * BLOCK_SIZE, 0)  # takes both blocks: PROMPT's cached one is evicted
    good = manager.transfer.cpu_caches
    if fail:  # a copy that raises in the transfer thread (a block shape the device block does not fit)
        manager.transfer.cpu_caches = [torch.zeros(good[0].shape[0], *SHAPE[:-1], 3)]
    manager.flush_stores()
    manager.transfer.cpu_caches = good
    bm.free("b")
    return kv


def test_load_matched_to_a_block_whose_store_failed_is_a_miss(
        setup: tuple[BlockManager, OffloadManager, list[torch.Tensor]]) -> None:
    bm, manager, _ = setup
    _evict_prompt(bm, manager, fail=True)
    hit = bm.match_prefix(PROMPT + [99], BLOCK_SIZE)
    assert hit.num_tokens == 0
    assert manager.match(PROMPT + [99], hit, BLOCK_SIZE) is None
    assert manager.tier.num_used_blocks() == 0
    manager.check_integrity()
    manager.wait_idle(timeout=60.0)
    assert manager.idle and manager.stored_blocks == 0
    manager.check_integrity()


def test_load_matched_to_a_block_being_stored_reads_its_kv(
        setup: tuple[BlockManager, OffloadManager, list[torch.Tensor]]) -> None:
    bm, manager, caches = setup
    kv = _evict_prompt(bm, manager, fail=False)
    hit = bm.match_prefix(PROMPT + [99], BLOCK_SIZE)
    cpu_hit = manager.match(PROMPT + [99], hit, BLOCK_SIZE)
    assert cpu_hit is not None and cpu_hit.num_tokens == BLOCK_SIZE
    assert bm.allocate("c", BLOCK_SIZE + 1, BLOCK_SIZE)
    block = bm.block_ids("c")[0][0]
    caches[0][block].zero_()
    manager.start_load(bm.block_ids("c"), cpu_hit)
    manager.wait_idle(timeout=60.0)
    assert torch.equal(caches[0][block], kv)
    assert manager.stored_blocks == 1 and manager.loaded_blocks == 1
    manager.check_integrity()
