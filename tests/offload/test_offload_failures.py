"""CPU-tier jobs that cannot be queued or that fail: no tier entry without its KV, and every finished
job accounted. The block manager and the tier are integrity-checked after each failure."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from pdlaunch.errors import EngineError
from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.offload.cpu_tier import CPUTier
from pdlaunch.offload.manager import OffloadManager
from pdlaunch.offload.transfer import TransferResult, device_fault
from pdlaunch.offload.transfer_spec import GPULoadStoreSpec, TransferSpec

BLOCK_SIZE = 4
SHAPE = (1, 2, BLOCK_SIZE, 1, 2)  # one device block: [layers, 2, block_size, kv_heads, head_dim]
NUM_BLOCKS = 4


@pytest.fixture
def setup() -> Iterator[tuple[BlockManager, OffloadManager]]:
    bm = BlockManager(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    caches = [torch.arange(NUM_BLOCKS * 16, dtype=torch.float32).reshape(NUM_BLOCKS, *SHAPE)]
    gb = NUM_BLOCKS * CPUTier.bytes_per_block([SHAPE], torch.float32) / 2**30
    manager = OffloadManager(bm, lambda: caches, gb)
    yield bm, manager
    manager.shutdown()


def _check(bm: BlockManager, manager: OffloadManager) -> None:
    bm.check_integrity()
    manager.check_integrity()


def _evict(bm: BlockManager, prompt: list[int]) -> None:
    """Cache `prompt`'s blocks, then take every device block for another request: they are evicted."""
    assert bm.allocate("a", len(prompt), 0)
    bm.cache_blocks("a", prompt, len(prompt))
    bm.free("a")
    assert bm.allocate("b", NUM_BLOCKS * BLOCK_SIZE, 0)
    bm.free("b")


def _cpu_hit_misses(bm: BlockManager, manager: OffloadManager, prompt: list[int]) -> bool:
    query = prompt + [99]
    return manager.match(query, bm.match_prefix(query, len(prompt)), len(prompt)) is None


def _shut_down(job_id: int, spec: TransferSpec) -> bool:
    return False  # what transfer_async answers once the transfer thread is shut down


def _rejected(job_id: int, spec: TransferSpec) -> bool:
    raise EngineError("group 0: a block id is out of range", field="offload.spec")


@pytest.mark.parametrize("submit", [_shut_down, _rejected])
def test_a_store_that_cannot_be_queued_leaves_no_tier_entry(
        setup: tuple[BlockManager, OffloadManager], monkeypatch: pytest.MonkeyPatch,
        submit: Callable[[int, TransferSpec], bool]) -> None:
    """Its CPU blocks were handed out before the job was queued: they stayed indexed with KV never
    written, and a later prefix hit loaded that into a request. Now they go back to the free list."""
    bm, manager = setup
    prompt = list(range(1, 2 * BLOCK_SIZE + 1))
    _evict(bm, prompt)
    monkeypatch.setattr(manager.transfer, "transfer_async", submit)
    manager.flush_stores()
    assert manager.tier.num_used_blocks() == 0 and len(manager.tier.free) == manager.tier.num_blocks
    assert _cpu_hit_misses(bm, manager, prompt)
    assert manager.idle and manager.stored_blocks == 0
    _check(bm, manager)

    monkeypatch.undo()  # the next eviction of the prompt stores it
    _evict(bm, prompt)
    manager.wait_idle(timeout=60.0)
    assert manager.stored_blocks == 2 and not _cpu_hit_misses(bm, manager, prompt)
    _check(bm, manager)


def test_a_store_queued_before_one_that_fails_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    """flush_stores queues one job per set of groups: a failing one drops only its own blocks."""
    # Group 1 has a window of 4 tokens: a 2-block prompt computed from position 8 caches block 0
    # in group 0 only and block 1 in both groups, so evicting them queues two store jobs.
    bm = BlockManager(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, sliding_windows=(None, 4))
    caches = [torch.ones(NUM_BLOCKS, *SHAPE), torch.ones(NUM_BLOCKS, *SHAPE)]
    gb = NUM_BLOCKS * CPUTier.bytes_per_block([SHAPE] * 2, torch.float32) / 2**30
    manager = OffloadManager(bm, lambda: caches, gb)
    try:
        submit = manager.transfer.transfer_async
        calls: list[GPULoadStoreSpec] = []

        def second_fails(job_id: int, spec: TransferSpec) -> bool:
            assert isinstance(spec[0], GPULoadStoreSpec)
            calls.append(spec[0])
            return submit(job_id, spec) if len(calls) == 1 else False

        prompt = list(range(1, 2 * BLOCK_SIZE + 1))
        assert bm.allocate("a", len(prompt), len(prompt))
        assert bm.block_ids("a")[1][0] == -1
        bm.cache_blocks("a", prompt, len(prompt))
        bm.free("a")
        assert bm.allocate("b", NUM_BLOCKS * BLOCK_SIZE, 0)
        bm.free("b")
        monkeypatch.setattr(manager.transfer, "transfer_async", second_fails)
        manager.flush_stores()
        manager.wait_idle(timeout=60.0)
        assert sorted(spec.group_sizes for spec in calls) == [(1, 0), (1, 1)]
        (kept,) = manager.tier.entries.values()  # the first job's block, in the groups it stored
        assert kept.groups == frozenset(g for g, n in enumerate(calls[0].group_sizes) if n)
        assert manager.stored_blocks == 1
        _check(bm, manager)
    finally:
        manager.shutdown()


def _load_then_two_stores(bm: BlockManager, manager: OffloadManager) -> tuple[list[int], list[int], list[int]]:
    """A load of one CPU block for request "c", then two stores; every job finished but none accounted.
    Returns the loaded prompt and the two stored ones."""
    loaded = list(range(1, BLOCK_SIZE + 1))
    block_hash = bm.index.hash_fn(None, tuple(loaded))
    assert manager.tier.allocate(block_hash, None, tuple(loaded), frozenset({0})) is not None
    query = loaded + [99]
    cpu_hit = manager.match(query, bm.match_prefix(query, BLOCK_SIZE), BLOCK_SIZE)
    assert cpu_hit is not None
    assert bm.allocate("c", BLOCK_SIZE + 1, BLOCK_SIZE)
    manager.start_load("c", bm.block_ids("c"), cpu_hit)
    manager.transfer.wait_all()
    bm.free("c")
    failed_store, stored = list(range(20, 20 + BLOCK_SIZE)), list(range(40, 40 + BLOCK_SIZE))
    for prompt in (failed_store, stored):
        _evict(bm, prompt)
        manager.flush_stores()
    manager.transfer.wait_all()
    assert len(manager.jobs.in_flight) == 3  # the load, then two stores
    return loaded, failed_store, stored


def _fail(manager: OffloadManager, monkeypatch: pytest.MonkeyPatch, jobs: list[int], error: str,
          device_fault: bool) -> None:
    finished = manager.transfer.get_finished

    def with_failures() -> list[TransferResult]:
        results = finished()
        for r in results:
            if r.job_id in jobs:
                r.success, r.error, r.device_fault = False, error, device_fault
        return results

    monkeypatch.setattr(manager.transfer, "get_finished", with_failures)


def test_a_failed_load_drops_its_blocks_and_names_its_request(setup: tuple[BlockManager, OffloadManager],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed load raised out of poll and stopped the engine. Now its CPU blocks are dropped (they may be
    what broke it: not hit again) and its request is handed over for the engine to end; every finished job is
    accounted, a failed store among them drops its own blocks."""
    bm, manager = setup
    loaded, failed_store, stored = _load_then_two_stores(bm, manager)
    _fail(manager, monkeypatch, list(manager.jobs.in_flight)[:2], "RuntimeError: injected", device_fault=False)
    manager.poll()
    assert manager.take_failed_loads() == [("c", "RuntimeError: injected")]
    assert manager.take_failed_loads() == []
    assert manager.idle and not manager.jobs.storing
    assert manager.stored_blocks == 1 and manager.loaded_blocks == 0
    assert _cpu_hit_misses(bm, manager, loaded)
    assert _cpu_hit_misses(bm, manager, failed_store) and not _cpu_hit_misses(bm, manager, stored)
    _check(bm, manager)


def test_a_load_that_failed_on_the_device_is_fatal_once_every_job_is_accounted(
        setup: tuple[BlockManager, OffloadManager], monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA runtime error leaves the device's state unknown: the engine stops, as before, but only after
    the results behind it were handled (they stayed unaccounted and `idle` never came back)."""
    bm, manager = setup
    _, failed_store, stored = _load_then_two_stores(bm, manager)
    _fail(manager, monkeypatch, list(manager.jobs.in_flight)[:2],
          "AcceleratorError: CUDA error: an illegal memory access", device_fault=True)
    with pytest.raises(EngineError, match="CPU tier failed on the device: AcceleratorError: CUDA error"):
        manager.poll()
    assert manager.idle and not manager.jobs.storing
    assert manager.stored_blocks == 1 and manager.loaded_blocks == 0
    assert _cpu_hit_misses(bm, manager, failed_store) and not _cpu_hit_misses(bm, manager, stored)
    _check(bm, manager)


@pytest.mark.parametrize(("exc", "fault"), [
    (RuntimeError("The size of tensor a (2) must match the size of tensor b (3)"), False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (EngineError("group 0: a block id is out of range", field="offload.spec"), False),
])
def test_device_faults_are_told_from_other_copy_errors(exc: Exception, fault: bool) -> None:
    assert device_fault(exc) is fault
