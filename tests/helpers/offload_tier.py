"""An OffloadManager over a small device cache whose CPU tier already holds the first two blocks of one prompt
(tokens BASE, BASE + 1, ...): the scheduler tests of loads from the CPU tier (tests/engine, tests/offload)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.offload.cpu_tier import CPUTier
from pdlaunch.offload.manager import OffloadManager
from tests.engine.test_scheduler import BS

SHAPE = (1, 2, BS, 1, 2)  # one device block: [layers, 2, block_size, kv_heads, head_dim]
NUM_BLOCKS = 16
BASE = 500  # the prompt whose first two blocks the CPU tier holds


def manager_holding_two_blocks() -> Iterator[OffloadManager]:
    """Yields the manager (a fixture's body); shuts it down after."""
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
