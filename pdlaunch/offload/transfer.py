"""Block copies between the device KV cache and the CPU tier, for every KV-cache group in one job.

What a job moves and where its blocks lie on both sides (the specs, the addressing) is transfer_spec.py's.

Ordering. One worker thread issues every job in submission order (on CUDA onto one transfer
stream), so transfers never overtake each other: a load submitted after a store reads what that
store wrote, and a store into a CPU block runs after any earlier load from it. Against compute: a
job starts after the compute queued before `transfer_async` (CUDA: an event recorded on the
caller's stream), and `order_before_compute` makes the next compute wait for every submitted job
(CUDA: the compute stream waits on the jobs' events; CPU: the host waits, copies being synchronous).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pdlaunch.errors import EngineError
from pdlaunch.memory.platform import cuda_event, cuda_stream, event_done, set_device
from pdlaunch.offload.transfer_spec import CPULoadStoreSpec, GPULoadStoreSpec, TransferSpec, copy_runs

__all__ = ["TransferResult", "CpuGpuTransfer", "device_fault"]


@dataclass
class TransferResult:
    job_id: int
    success: bool
    num_bytes: int
    seconds: float
    store: bool  # device -> CPU
    error: str | None = None
    device_fault: bool = False  # the error came from the CUDA runtime: the device's state is unknown


def device_fault(exc: BaseException) -> bool:
    """Whether `exc` is a CUDA runtime error (torch >= 2.8 raises AcceleratorError, older ones a
    RuntimeError naming it): unlike a bad spec or tensor, it can leave any copy on the device half done."""
    return isinstance(exc, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(exc)


@dataclass
class _CudaEvents:
    ready: torch.cuda.Event  # recorded on the compute stream: the job's copies wait for it
    start: torch.cuda.Event  # on the copy stream, before the first copy
    done: torch.cuda.Event  # after the last copy


@dataclass
class _Job:
    job_id: int
    issued: Future[None]  # done once every copy is issued (on CPU: done)
    events: _CudaEvents | None  # CUDA only
    started_at: float
    num_bytes: int
    store: bool


class CpuGpuTransfer:
    """Runs transfer jobs between per-group device caches and per-group CPU caches."""

    def __init__(self, gpu_caches: Sequence[torch.Tensor], cpu_caches: Sequence[torch.Tensor],
                 block_size_factor: int = 1) -> None:
        if len(gpu_caches) != len(cpu_caches):
            raise EngineError(f"{len(gpu_caches)} device cache groups but {len(cpu_caches)} CPU ones",
                              field="offload", hint="build the CPU tier from the same KV-cache groups")
        for g, (dev, cpu) in enumerate(zip(gpu_caches, cpu_caches)):
            if dev.shape[1:] != cpu.shape[1:] or dev.dtype != cpu.dtype or cpu.shape[0] % block_size_factor:
                raise EngineError(f"group {g}: device blocks {tuple(dev.shape[1:])} {dev.dtype} and CPU blocks "
                                  f"{tuple(cpu.shape[1:])} {cpu.dtype} (x{block_size_factor}) differ",
                                  field="offload", hint="the CPU tier must use the device cache's block layout")
        self.gpu_caches = list(gpu_caches)  # replaced by the owner when the device cache is reallocated
        self.cpu_caches = list(cpu_caches)  # per group [num_cpu_blocks * factor, ...]: sub-block addressing
        self.factor = block_size_factor
        device = gpu_caches[0].device if gpu_caches else torch.device("cpu")
        self.cuda = device.type == "cuda"
        # Captured here, in the constructing thread: the worker binds it once at start (vLLM #39548).
        self.device_index = device.index if self.cuda and device.index is not None else 0
        self.stream = cuda_stream(device) if self.cuda else None
        self._worker: threading.Thread | None = None  # the pool's one thread, once it started
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-offload", initializer=self._start_worker)
        self._jobs: dict[int, _Job] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _start_worker(self) -> None:
        self._worker = threading.current_thread()
        set_device(self.device_index)

    # -- jobs ------------------------------------------------------------------------------------
    def transfer_async(self, job_id: int, spec: TransferSpec) -> bool:
        """Queue one job (device->CPU when spec[0] is the device side). False when it cannot run."""
        src, dst = spec
        store = isinstance(src, GPULoadStoreSpec)
        gpu, cpu = (src, dst) if store else (dst, src)
        if not isinstance(gpu, GPULoadStoreSpec) or not isinstance(cpu, CPULoadStoreSpec):
            raise EngineError("a transfer spec pairs one device side with one CPU side", field="offload.spec")
        if self._closed or job_id in self._jobs:
            return False
        copies = copy_runs(gpu, cpu, self.gpu_caches, self.cpu_caches, self.factor)
        gpu_caches, cpu_caches = list(self.gpu_caches), list(self.cpu_caches)
        num_bytes = sum(n * gpu_caches[g][0].nbytes for g, runs in copies for _, _, n in runs)
        events = _CudaEvents(cuda_event(), cuda_event(timing=True), cuda_event(timing=True)) if self.cuda else None
        if events is not None:
            events.ready.record(torch.cuda.current_stream(gpu_caches[0].device))  # compute queued so far
        stream = self.stream

        def issue() -> None:
            ctx = torch.cuda.stream(stream) if stream is not None else nullcontext()
            with ctx:
                if stream is not None and events is not None:
                    stream.wait_event(events.ready)
                    events.start.record(stream)
                try:
                    for g, runs in copies:
                        dev, host = gpu_caches[g], cpu_caches[g]
                        for b, s, n in runs:
                            if store:
                                host[s:s + n].copy_(dev[b:b + n], non_blocking=self.cuda)
                            else:
                                dev[b:b + n].copy_(host[s:s + n], non_blocking=self.cuda)
                except BaseException:
                    # A failed job is reported done and its blocks go back: the copies it issued end first.
                    if stream is not None:
                        stream.synchronize()
                    raise
                if stream is not None and events is not None:
                    events.done.record(stream)

        job = _Job(job_id, self._pool.submit(issue), events, time.perf_counter(), num_bytes, store)
        with self._lock:
            self._jobs[job_id] = job
        return True

    def _finished(self, job: _Job) -> bool:
        if not job.issued.done():
            return False
        return job.issued.exception() is not None or job.events is None or event_done(job.events.done)

    def get_finished(self) -> list[TransferResult]:
        """Jobs completed since the last call (never blocks)."""
        with self._lock:
            ready = [j for j in self._jobs.values() if self._finished(j)]
            for j in ready:
                del self._jobs[j.job_id]
        results = []
        for j in ready:
            exc = j.issued.exception()
            if j.events is not None and exc is None:
                seconds = j.events.start.elapsed_time(j.events.done) / 1e3
            else:
                seconds = time.perf_counter() - j.started_at
            results.append(TransferResult(j.job_id, exc is None, j.num_bytes if exc is None else 0, seconds, j.store,
                                          None if exc is None else f"{type(exc).__name__}: {exc}",
                                          exc is not None and device_fault(exc)))
        return results

    def _issued(self, jobs: list[_Job], timeout: float, what: str) -> Iterator[_Job]:
        """Yield each of `jobs` once its copies are issued (on CPU: done), skipping one that failed to
        issue (get_finished reports it). One deadline for all; EngineError naming `what` past it."""
        deadline = time.monotonic() + timeout
        for j in jobs:
            try:
                j.issued.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError as exc:
                raise EngineError(f"KV offload job {j.job_id} was not issued within {timeout:.0f}s "
                                  f"(waiting {what})", field="offload",
                                  hint="the transfer thread is stuck; see the log") from exc
            except Exception:  # noqa: BLE001 - a failed job is reported by get_finished
                continue
            yield j

    def order_before_compute(self, timeout: float = 60.0) -> None:
        """Make the next compute on this device wait for every job submitted so far."""
        with self._lock:
            jobs = list(self._jobs.values())
        for j in self._issued(jobs, timeout, "to order the next compute after it"):
            if j.events is not None:
                torch.cuda.current_stream(self.gpu_caches[0].device).wait_event(j.events.done)

    def wait_issued(self, job_ids: Iterable[int], timeout: float = 60.0) -> None:
        """Block until the copies of these jobs are issued (on CPU: done): one that failed to issue is
        then reported by get_finished."""
        with self._lock:
            jobs = [self._jobs[j] for j in job_ids if j in self._jobs]
        for _ in self._issued(jobs, timeout, "for a store that a prefix hit reads"):
            pass

    def wait_all(self, timeout: float = 60.0) -> None:
        """Block the host until every submitted job has completed (tests, shutdown, sleep); one deadline
        for all, EngineError naming the job past it."""
        deadline = time.monotonic() + timeout
        self.order_before_compute(timeout)
        with self._lock:
            done = [(j.job_id, j.events.done) for j in self._jobs.values() if j.events is not None]
        for job_id, event in done:
            while not event_done(event):
                if time.monotonic() >= deadline:
                    raise EngineError(f"KV offload job {job_id} did not complete within {timeout:.0f}s "
                                      "(waiting for its copies on the transfer stream)", field="offload",
                                      hint="the device is stuck; see the log and restart the instance")
                time.sleep(0.001)  # a CUDA event has no wait with a timeout: poll it

    def num_pending(self) -> int:
        with self._lock:
            return len(self._jobs)

    def shutdown(self, timeout: float = 60.0) -> None:
        """Finish what was queued, stop the worker thread (one deadline for both). Idempotent."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        try:
            self.wait_all(timeout)
        finally:
            self._pool.shutdown(wait=False)  # its thread exits once its queue is done
        if self._worker is not None:
            self._worker.join(max(0.0, deadline - time.monotonic()))
            if self._worker.is_alive():
                raise EngineError(f"the KV offload transfer thread did not stop within {timeout:.0f}s "
                                  "(waiting for it to finish its queued work and exit)", field="offload",
                                  hint="the transfer thread is stuck; see the log")

