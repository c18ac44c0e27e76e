"""Multi-group device<->CPU transfer jobs: random group sizes, unaligned block_indices, bit-exact
round trips. The same tests run on CUDA (marked gpu) with pinned CPU caches and the transfer stream."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from pdlaunch.errors import EngineError
from pdlaunch.memory.platform import bound_device_index
from pdlaunch.offload.transfer import CpuGpuTransfer
from pdlaunch.offload.transfer_spec import CPULoadStoreSpec, GPULoadStoreSpec, block_runs

BLOCK_SHAPE = (2, 4, 2, 8)  # 2 (k, v), block_size 4, 2 kv heads, head_dim 8


def _caches(num_blocks: int, layers: list[int], device: str, fill: bool, pin: bool = False) -> list[torch.Tensor]:
    out = []
    for n in layers:
        if fill:
            t = torch.randn(num_blocks, n, *BLOCK_SHAPE, dtype=torch.float16, device=device)
        else:
            t = torch.zeros(num_blocks, n, *BLOCK_SHAPE, dtype=torch.float16, device=device)
        out.append(t.pin_memory() if pin else t)
    return out


def _finish(transfer: CpuGpuTransfer, job_ids: set[int]) -> None:
    transfer.wait_all()
    results = transfer.get_finished()
    assert {r.job_id for r in results} == job_ids
    assert all(r.success and r.num_bytes > 0 for r in results), results
    assert transfer.num_pending() == 0


def _round_trip(device: str, seed: int, factor: int) -> None:
    rng = random.Random(seed)
    layers = [rng.randint(1, 3) for _ in range(rng.randint(1, 4))]  # groups with different block sizes
    num_gpu, num_cpu = 40, 24
    gpu = _caches(num_gpu, layers, device, fill=True)
    cpu = _caches(num_cpu * factor, layers, "cpu", fill=False, pin=device == "cuda")
    transfer = CpuGpuTransfer(gpu, cpu, block_size_factor=factor)
    try:
        num_logical = rng.randint(1, 12)
        # Group g moves the tail of the job's logical blocks, from an arbitrary (unaligned) start;
        # a group may move nothing at all.
        starts = [rng.randint(0, num_logical) for _ in layers]
        starts[0] = 0 if rng.random() < 0.5 else starts[0]
        sizes = [num_logical - s for s in starts]
        src_ids = [rng.sample(range(num_gpu - 3), n) for n in sizes]
        if sizes[0] > 2:  # a run of consecutive device blocks too, to exercise coalesced copies
            src_ids[0][:3] = [num_gpu - 3, num_gpu - 2, num_gpu - 1]
        cpu_ids = rng.sample(range(num_cpu), -(-num_logical // factor))
        store_gpu = GPULoadStoreSpec(tuple(b for ids in src_ids for b in ids), tuple(sizes), tuple(starts))
        cpu_spec = CPULoadStoreSpec(tuple(cpu_ids))
        assert transfer.transfer_async(1, (store_gpu, cpu_spec))
        _finish(transfer, {1})

        # Exactly the addressed sub-blocks were written, nothing else.
        for g, ids in enumerate(src_ids):
            written = set()
            for i, b in enumerate(ids):
                j = starts[g] + i
                sub = cpu_ids[j // factor] * factor + j % factor
                written.add(sub)
                assert torch.equal(cpu[g][sub], gpu[g][b].cpu())
            untouched = [s for s in range(num_cpu * factor) if s not in written]
            assert not cpu[g][untouched].any()

        # Load back into other device blocks of fresh caches: bit-exact.
        dst = _caches(num_gpu, layers, device, fill=False)
        transfer.gpu_caches = dst
        dst_ids = [rng.sample(range(num_gpu), n) for n in sizes]
        load_gpu = GPULoadStoreSpec(tuple(b for ids in dst_ids for b in ids), tuple(sizes), tuple(starts))
        assert transfer.transfer_async(2, (cpu_spec, load_gpu))
        transfer.order_before_compute()
        for g in range(len(layers)):
            for s_b, d_b in zip(src_ids[g], dst_ids[g]):
                assert torch.equal(dst[g][d_b], gpu[g][s_b])
            others = [b for b in range(num_gpu) if b not in dst_ids[g]]
            assert not dst[g][others].any()
        _finish(transfer, {2})
    finally:
        transfer.shutdown()


@pytest.mark.parametrize("factor", [1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_multi_group_round_trip_cpu(seed: int, factor: int) -> None:
    _round_trip("cpu", seed, factor)


@pytest.mark.gpu
@pytest.mark.parametrize("factor", [1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_multi_group_round_trip_cuda(seed: int, factor: int) -> None:
    _round_trip("cuda", seed, factor)


def test_unaligned_start_keeps_neighbour_sub_blocks() -> None:
    """factor 4, group 1 starts at logical block 2: sub-blocks 0-1 of the first CPU block stay as they were."""
    gpu = _caches(8, [1, 2], "cpu", fill=True)
    cpu = _caches(8, [1, 2], "cpu", fill=False)
    cpu[1][4:6] = 7.0  # CPU block 1, sub-blocks 0 and 1
    transfer = CpuGpuTransfer(gpu, cpu, block_size_factor=4)
    try:
        spec = GPULoadStoreSpec((0, 1, 2, 3, 4, 5, 6, 7), (5, 3), (0, 2))
        assert transfer.transfer_async(7, (spec, CPULoadStoreSpec((1, 0))))
        _finish(transfer, {7})
        assert torch.equal(cpu[0][4:8], gpu[0][0:4]) and torch.equal(cpu[0][0], gpu[0][4])
        assert bool((cpu[1][4:6] == 7.0).all())
        assert torch.equal(cpu[1][6:8], gpu[1][5:7]) and torch.equal(cpu[1][0], gpu[1][7])
    finally:
        transfer.shutdown()


def test_jobs_run_in_order_and_worker_binds_device() -> None:
    """A load submitted right after a store reads what the store wrote (one ordered worker), and
    the worker thread bound the instance's device index when it started."""
    gpu = _caches(4, [2], "cpu", fill=True)
    cpu = _caches(4, [2], "cpu", fill=False)
    transfer = CpuGpuTransfer(gpu, cpu)
    try:
        expected = gpu[0][1].clone()
        assert transfer.transfer_async(1, (GPULoadStoreSpec((1,), (1,), (0,)), CPULoadStoreSpec((3,))))
        assert transfer.transfer_async(2, (CPULoadStoreSpec((3,)), GPULoadStoreSpec((2,), (1,), (0,))))
        assert not transfer.transfer_async(2, (CPULoadStoreSpec((3,)), GPULoadStoreSpec((2,), (1,), (0,))))
        _finish(transfer, {1, 2})
        assert torch.equal(gpu[0][2], expected)
        seen: list[int | None] = []
        transfer._pool.submit(lambda: seen.append(bound_device_index())).result(timeout=10)
        assert seen == [transfer.device_index]
    finally:
        transfer.shutdown()
    assert not transfer.transfer_async(3, (GPULoadStoreSpec((1,), (1,), (0,)), CPULoadStoreSpec((3,))))


def test_bad_specs_are_rejected() -> None:
    gpu = _caches(4, [1, 1], "cpu", fill=True)
    cpu = _caches(4, [1, 1], "cpu", fill=False)
    transfer = CpuGpuTransfer(gpu, cpu)
    try:
        with pytest.raises(EngineError, match="do not split"):
            GPULoadStoreSpec((0, 1), (1, 2), (0, 0))
        with pytest.raises(EngineError, match="block index per"):
            GPULoadStoreSpec((0,), (1, 0), (0,))
        with pytest.raises(EngineError, match="need 3 CPU blocks"):
            transfer.transfer_async(1, (GPULoadStoreSpec((0, 1), (1, 1), (0, 2)), CPULoadStoreSpec((0, 1))))
        with pytest.raises(EngineError, match="out of range"):
            transfer.transfer_async(1, (GPULoadStoreSpec((9,), (1, 0), (0, 0)), CPULoadStoreSpec((0,))))
        with pytest.raises(EngineError, match="groups"):
            transfer.transfer_async(1, (GPULoadStoreSpec((0,), (1,), (0,)), CPULoadStoreSpec((0,))))
        assert transfer.num_pending() == 0
    finally:
        transfer.shutdown()
    with pytest.raises(EngineError, match="block layout"):
        CpuGpuTransfer(gpu, _caches(4, [2, 1], "cpu", fill=False))


def test_block_runs_coalesce() -> None:
    assert block_runs([3, 4, 5, 9, 10], [0, 1, 2, 7, 6]) == [(3, 0, 3), (9, 7, 1), (10, 6, 1)]
    assert block_runs([], []) == []


@pytest.mark.parametrize("wait", ["order_before_compute", "wait_issued"])
def test_a_stuck_transfer_thread_times_out_naming_the_wait(wait: str) -> None:
    """Both waits on issued jobs share one deadline and say which job and what they waited for."""
    gpu = _caches(4, [1], "cpu", fill=True)
    cpu = _caches(4, [1], "cpu", fill=False)
    transfer = CpuGpuTransfer(gpu, cpu)
    stuck = threading.Event()
    try:
        transfer._pool.submit(stuck.wait, 60)  # the one worker is busy: job 5 cannot be issued
        assert transfer.transfer_async(5, (GPULoadStoreSpec((1,), (1,), (0,)), CPULoadStoreSpec((2,))))
        calls = {"order_before_compute": (lambda: transfer.order_before_compute(0.05), "to order the next compute"),
                 "wait_issued": (lambda: transfer.wait_issued([5], 0.05), "for a store that a prefix hit reads")}
        call, what = calls[wait]
        with pytest.raises(EngineError, match=f"job 5 was not issued within 0s \\(waiting {what}"):
            call()
        stuck.set()
        _finish(transfer, {5})
    finally:
        stuck.set()
        transfer.shutdown()
