"""Every wait on the KV offload transfer thread or its copies is bounded and says what it waited for
(a CUDA event has no wait with a timeout: it is polled)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pdlaunch.errors import EngineError
from pdlaunch.offload.transfer import CpuGpuTransfer, _CudaEvents, _Job
from pdlaunch.offload.transfer_spec import CPULoadStoreSpec, GPULoadStoreSpec

SHAPE = (1, 2, 4, 1, 2)  # one device block: [layers, 2, block_size, kv_heads, head_dim]


class _StuckEvent:
    """A CUDA event whose work never completes: query() polls it, synchronize() would block forever."""

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        raise AssertionError("an unbounded wait on a CUDA event")

    def elapsed_time(self, other: object) -> float:
        return 0.0


class _Stream:
    def wait_event(self, event: object) -> None:
        pass


def test_wait_all_on_a_copy_that_never_completes_times_out_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    transfer = CpuGpuTransfer([torch.zeros(2, *SHAPE)], [torch.zeros(2, *SHAPE)])
    issued = transfer._pool.submit(lambda: None)
    issued.result(timeout=60)
    event = _StuckEvent()
    job = _Job(9, issued, _CudaEvents(event, event, event), time.perf_counter(), 0, True)  # type: ignore[arg-type]
    transfer._jobs[9] = job
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    try:
        with pytest.raises(EngineError, match=r"job 9 did not complete within 0s \(waiting for its copies"):
            transfer.wait_all(timeout=0.05)
    finally:
        del transfer._jobs[9]
        transfer.shutdown()


def test_shutdown_with_a_stuck_transfer_thread_times_out_naming_it() -> None:
    transfer = CpuGpuTransfer([torch.zeros(2, *SHAPE)], [torch.zeros(2, *SHAPE)])
    started, stuck = threading.Event(), threading.Event()

    def busy() -> None:
        started.set()
        stuck.wait(60)

    try:
        transfer._pool.submit(busy)  # the one worker never gets through its queue
        assert started.wait(60)
        began = time.monotonic()
        with pytest.raises(EngineError, match=r"did not stop within 0s \(waiting for"):
            transfer.shutdown(timeout=0.05)
        assert time.monotonic() - began < 30  # the worker is busy for 60s
        assert not transfer.transfer_async(1, (GPULoadStoreSpec((1,), (1,), (0,)), CPULoadStoreSpec((0,))))
    finally:
        stuck.set()
    assert transfer._worker is not None
    transfer._worker.join(60)  # the worker exits once its work is done: no thread left behind
    assert not transfer._worker.is_alive()
    transfer.shutdown()  # idempotent
