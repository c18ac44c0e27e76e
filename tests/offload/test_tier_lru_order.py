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


def test_a_flush_that_evicts_its_own_store_never_writes_the_evicted_block() -> None:
    """A flush that overflows the tier evicts blocks it allocated itself; their stores must not be queued: the
    CPU block now belongs to a later entry, and a store of another groups' set is another job, which may run
    after that entry's and leave it the evicted block's KV under its hash."""
    windows = (None, BLOCK_SIZE)  # group 1 keeps only a prompt's last block
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, sliding_windows=windows)
    caches = [torch.zeros(8, *SHAPE), torch.zeros(8, *SHAPE)]
    for c in caches:  # every device block distinct: a CPU block shows whose KV it holds
        c.copy_(torch.arange(c.numel(), dtype=c.dtype).view(c.shape))
    manager = OffloadManager(bm, lambda: caches, 2 * CPUTier.bytes_per_block([SHAPE, SHAPE], torch.float32) / 2**30)
    try:
        assert manager.tier.num_blocks == 2
        p, q = _prompt(100, 3), _prompt(200, 3)
        # Group 1 holds none of p's blocks (as when its window moved on and they were evicted from it already).
        assert bm.allocate("p", len(p), len(p) + BLOCK_SIZE)
        assert bm.allocate("q", len(q), 0)  # q's every block in both groups
        bm.cache_blocks("p", p, len(p))
        bm.cache_blocks("q", q, len(q))
        p_nodes, q_nodes = bm.chains["p"], bm.chains["q"]
        # Deepest first: p[2] (group 0 only) and q[2] (both groups) fill the tier, then p[1] evicts p[2] and p[0]
        # evicts q[2], whose store (both groups, its own job) would be queued after p[0]'s (group 0).
        for node in (p_nodes[2], q_nodes[2], p_nodes[1], p_nodes[0]):
            manager.on_evict(0, bm.pools[0].node_block[node], node)
        manager.wait_idle(timeout=60.0)
        hashes = _hashes(bm, p)
        assert list(manager.tier.entries) == [hashes[1], hashes[0]]
        for j in (0, 1):
            entry = manager.tier.entries[hashes[j]]
            assert entry.groups == frozenset({0})
            device_block = bm.block_ids("p")[0][j]
            assert torch.equal(manager.tier.caches[0][entry.block_id], caches[0][device_block]), \
                f"CPU block of p's block {j} holds another block's KV"
        assert manager.stored_blocks == 2, "stores of blocks the same flush evicted were queued"
        bm.free("p")
        bm.free("q")
        manager.check_integrity()
        bm.check_integrity()
    finally:
        manager.shutdown()
