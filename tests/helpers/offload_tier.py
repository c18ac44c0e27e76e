"""An OffloadManager over a small device cache whose CPU tier already holds the first two blocks of one prompt
(tokens BASE, BASE + 1, ...): the scheduler tests of loads from the CPU tier (tests/engine, tests/offload); and the
failure those tests inject into any manager's loads (`loads_fail_while_copying`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.offload.cpu_tier import CPUTier
from pdlaunch.offload.manager import OffloadManager
from pdlaunch.offload.transfer_spec import GPULoadStoreSpec, TransferSpec
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


def loads_fail_while_copying(manager: OffloadManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads are queued fine, then their copy raises in the transfer thread (CPU blocks of the wrong shape: same block
    count, one more element each); stores go on as usual. monkeypatch.undo() ends it."""
    submit, good = manager.transfer.transfer_async, manager.transfer.cpu_caches

    def submit_with_bad_source(job_id: int, spec: TransferSpec) -> bool:
        if isinstance(spec[0], GPULoadStoreSpec):
            return submit(job_id, spec)
        manager.transfer.cpu_caches = [torch.zeros(c.shape[0], *c.shape[1:-1], c.shape[-1] + 1) for c in good]
        try:
            return submit(job_id, spec)
        finally:
            manager.transfer.cpu_caches = good

    monkeypatch.setattr(manager.transfer, "transfer_async", submit_with_bad_source)
