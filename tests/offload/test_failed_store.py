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
from pdlaunch.offload.transfer_spec import GPULoadStoreSpec, TransferSpec

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
    manager.start_load("c", bm.block_ids("c"), cpu_hit)
    manager.wait_idle(timeout=60.0)
    assert torch.equal(caches[0][block], kv)
    assert manager.stored_blocks == 1 and manager.loaded_blocks == 1
    manager.check_integrity()


def _three_groups() -> tuple[BlockManager, list[torch.Tensor], OffloadManager]:
    """4 device blocks in three groups: full attention, a window of 8 tokens, one of 4; a CPU tier of 4 blocks."""
    bm = BlockManager(num_blocks=4, block_size=BLOCK_SIZE, sliding_windows=(None, 8, 4))
    caches = [torch.zeros(4, *SHAPE) for _ in range(3)]
    gb = 4 * CPUTier.bytes_per_block([SHAPE] * 3, torch.float32) / 2**30
    return bm, caches, OffloadManager(bm, lambda: caches, gb)

def test_store_into_a_block_a_load_is_about_to_read_does_not_touch_it() -> None:
    """start_load queues the evictions of its own allocation first; one of them is the prefix block the
    load reads, cached on the device in more groups than its CPU copy holds. Storing it again would
    write into that CPU block, and a store that fails halfway would leave the load a partial copy."""
    # Group 0 full attention, group 1 a window of 8 tokens, group 2 of 4: a 3-block CPU hit needs
    # block 0 only in group 0, block 1 in groups 0-1, block 2 in all three.
    bm, caches, manager = _three_groups()
    try:
        prompt = list(range(1, 3 * BLOCK_SIZE + 1))
        hashes: list[int] = []
        parent: int | None = None
        for j, groups in enumerate([{0}, {0, 1}, {0, 1, 2}]):  # what the CPU tier already holds
            tokens = tuple(prompt[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE])
            block_hash = bm.index.hash_fn(parent, tokens)
            entry = manager.tier.allocate(block_hash, parent, tokens, frozenset(groups))
            assert entry is not None
            for g in groups:
                manager.tier.caches[g][entry.block_id].fill_(100 * j + g + 1)
            hashes.append(block_hash)
            parent = block_hash
        # The device caches block 0 in groups 0 and 1 but not 2: no device hit.
        assert bm.allocate("a", BLOCK_SIZE, 2 * BLOCK_SIZE)
        assert bm.block_ids("a")[2] == [-1]
        bm.cache_blocks("a", prompt[:BLOCK_SIZE], BLOCK_SIZE)
        evicted = bm.block_ids("a")[0][0]
        bm.free("a")

        query = prompt + [99]
        hit = bm.match_prefix(query, len(prompt))
        assert hit.num_tokens == 0
        cpu_hit = manager.match(query, hit, len(prompt))
        assert cpu_hit is not None and [b.block_hash for b in cpu_hit.blocks] == hashes
        assert bm.allocate("c", len(query), len(prompt))  # evicts block 0 from the device (groups 0 and 1)
        target = bm.block_ids("c")[0][0]
        assert target != evicted
        caches[0][evicted].fill_(-7.0)  # the bytes a store failing halfway leaves in the CPU block

        good = manager.transfer.cpu_caches
        submit = manager.transfer.transfer_async

        def store_fails_after_group_0(job_id: int, spec: TransferSpec) -> bool:
            if not isinstance(spec[0], GPULoadStoreSpec):
                return submit(job_id, spec)
            manager.transfer.cpu_caches = [good[0], torch.zeros(good[1].shape[0], *SHAPE[:-1], 3), good[2]]
            try:
                return submit(job_id, spec)
            finally:
                manager.transfer.cpu_caches = good

        manager.transfer.transfer_async = store_fails_after_group_0  # type: ignore[method-assign]
        manager.start_load("c", bm.block_ids("c"), cpu_hit)
        manager.wait_idle(timeout=60.0)
        assert torch.equal(caches[0][target], torch.full(SHAPE, 1.0)), "the load read what a failed store left"
        assert manager.loaded_blocks == 3
        assert all(manager.tier.entries.get(h) is b for h, b in zip(hashes, cpu_hit.blocks))
        manager.check_integrity()
    finally:
        manager.shutdown()


def test_storing_a_block_again_in_other_groups_keeps_the_groups_it_held() -> None:
    """A prefix block the CPU tier holds in group 2 only, evicted from the device later in groups 0 and 1:
    the new store reused its CPU block but recorded groups {0, 1}, so group 2's KV, still there, was
    forgotten (a later load of that block in group 2 was a miss). Now the block holds all three."""
    bm, caches, manager = _three_groups()
    try:
        prompt = list(range(1, 3 * BLOCK_SIZE + 1))
        tokens = tuple(prompt[:BLOCK_SIZE])
        block_hash = bm.index.hash_fn(None, tokens)
        entry = manager.tier.allocate(block_hash, None, tokens, frozenset({2}))
        assert entry is not None
        manager.tier.caches[2][entry.block_id].fill_(42.0)
        # The device caches block 0 in groups 0 and 1 (not 2, outside its 4-token window), then evicts it.
        assert bm.allocate("a", BLOCK_SIZE, 2 * BLOCK_SIZE)
        assert bm.block_ids("a")[2] == [-1]
        bm.cache_blocks("a", prompt[:BLOCK_SIZE], BLOCK_SIZE)
        device_block = bm.block_ids("a")[0][0]
        caches[0][device_block].fill_(7.0)
        caches[1][bm.block_ids("a")[1][0]].fill_(8.0)
        bm.free("a")
        assert bm.allocate("b", 4 * BLOCK_SIZE, 0)  # every device block: block 0's cached copies are evicted
        manager.wait_idle(timeout=60.0)
        stored = manager.tier.entries[block_hash]
        assert stored.groups == frozenset({0, 1, 2})
        assert stored.block_id == entry.block_id and manager.stored_blocks == 1
        assert torch.equal(manager.tier.caches[2][stored.block_id], torch.full(SHAPE, 42.0))
        assert torch.equal(manager.tier.caches[0][stored.block_id], torch.full(SHAPE, 7.0))
        assert torch.equal(manager.tier.caches[1][stored.block_id], torch.full(SHAPE, 8.0))
        manager.check_integrity()
    finally:
        manager.shutdown()
