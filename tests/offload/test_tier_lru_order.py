"""The CPU tier evicts a cached chain's tail before its head: a prefix lookup stops at its first miss, so
a chain that lost its first block is useless however much of the rest stays. A hit touched its blocks
head first (block 0 became the oldest of the chain and went first) and a store kept the device's eviction
order, head first when a sliding-window group evicted the head early."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.offload.cpu_tier import CPUTier
from pdlaunch.offload.manager import OffloadManager

BLOCK_SIZE = 4
SHAPE = (1, 2, BLOCK_SIZE, 1, 2)  # one device block: [layers, 2, block_size, kv_heads, head_dim]
NUM_BLOCKS = 4  # device blocks


def _manager(tier_blocks: int) -> OffloadManager:
    bm = BlockManager(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    caches = [torch.zeros(NUM_BLOCKS, *SHAPE)]
    return OffloadManager(bm, lambda: caches, tier_blocks * CPUTier.bytes_per_block([SHAPE], torch.float32) / 2**30)


@pytest.fixture
def manager() -> Iterator[OffloadManager]:
    m = _manager(tier_blocks=4)
    assert m.tier.num_blocks == 4
    yield m
    m.shutdown()


def _prompt(base: int, num_blocks: int) -> list[int]:
    return list(range(base, base + num_blocks * BLOCK_SIZE))


def _hashes(bm: BlockManager, prompt: list[int]) -> list[int]:
    """The chained block hashes of `prompt`'s full blocks, head first."""
    out: list[int] = []
    for j in range(len(prompt) // BLOCK_SIZE):
        out.append(bm.index.hash_fn(out[-1] if out else None, tuple(prompt[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE])))
    return out


def _store(manager: OffloadManager, prompt: list[int]) -> None:
    """Compute and cache `prompt` on the device, then take every device block for another request: its
    blocks are evicted and stored to the CPU tier."""
    bm = manager.block_manager
    assert bm.allocate("a", len(prompt), 0)
    bm.cache_blocks("a", prompt, len(prompt))
    bm.free("a")
    assert bm.allocate("b", NUM_BLOCKS * BLOCK_SIZE, 0)
    bm.free("b")
    manager.wait_idle(timeout=60.0)


def _cpu_hit_tokens(manager: OffloadManager, prompt: list[int]) -> int:
    bm = manager.block_manager
    query = prompt + [99]
    cpu_hit = manager.match(query, bm.match_prefix(query, len(prompt)), len(prompt))
    return 0 if cpu_hit is None else cpu_hit.num_tokens


def test_touch_leaves_a_chains_head_most_recent() -> None:
    tier = CPUTier(4, [SHAPE], torch.float32, pin_memory=False)
    blocks = []
    for h in (10, 11, 12):  # a chain stored head first: the head is the oldest
        entry = tier.allocate(h, h - 1 if h > 10 else None, (h,), frozenset({0}))
        assert entry is not None
        blocks.append(entry)
    assert tier.lookup(10, None, (10,)) is blocks[0]
    assert list(tier.entries) == [10, 11, 12], "a lookup alone must not reorder: the caller touches what it uses"
    tier.touch(blocks)
    assert list(tier.entries) == [12, 11, 10]
    tier.drop(blocks[1])
    tier.touch(blocks)  # a dropped block is skipped, not indexed again
    assert list(tier.entries) == [12, 10]
    tier.check_integrity()


def test_a_hit_chain_loses_its_tail_before_its_head(manager: OffloadManager) -> None:
    bm = manager.block_manager
    hit, other, later = _prompt(100, 2), _prompt(200, 2), _prompt(300, 3)
    _store(manager, hit)
    _store(manager, other)  # the tier is full: the hit chain is the older one
    assert manager.tier.num_used_blocks() == 4
    assert _cpu_hit_tokens(manager, hit) == 2 * BLOCK_SIZE  # touches the hit chain
    _store(manager, later)  # evicts three of the four blocks stored before
    head, tail = _hashes(bm, hit)
    assert head in manager.tier.entries, "the hit chain's first block was evicted before its tail"
    assert tail not in manager.tier.entries
    assert not any(h in manager.tier.entries for h in _hashes(bm, other))
    assert _cpu_hit_tokens(manager, hit) == BLOCK_SIZE  # what is left of it is still a prefix hit
    assert _cpu_hit_tokens(manager, later) == 3 * BLOCK_SIZE
    manager.check_integrity()


def test_a_store_leaves_a_chains_head_most_recent_whatever_order_the_device_evicted_it_in() -> None:
    """One flush of a chain evicted head first (as a sliding-window group releases it) into a tier too small
    for all of it: the head is allocated last, so it is the most recent, and the overflow evicts the tail."""
    manager = _manager(tier_blocks=3)
    try:
        bm = manager.block_manager
        prompt = _prompt(100, NUM_BLOCKS)
        assert bm.allocate("a", len(prompt), 0)
        bm.cache_blocks("a", prompt, len(prompt))
        pool = bm.pools[0]
        for block_id in bm.block_ids("a")[0]:  # head first
            manager.on_evict(0, block_id, pool.block_node[block_id])
        manager.wait_idle(timeout=60.0)
        hashes = _hashes(bm, prompt)
        assert list(manager.tier.entries) == hashes[2::-1]  # oldest first: block 2, 1, then the head
        assert manager.tier.num_evicted == 1
        bm.free("a")
        manager.check_integrity()
        bm.check_integrity()
    finally:
        manager.shutdown()
