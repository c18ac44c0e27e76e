"""The offload transfer jobs of one engine, from submission to their outcome: what each moves, the CPU blocks a
store is still writing, the loads whose blocks count as tier hits once they did not fail, and what a failure
leaves behind (its CPU blocks dropped; a failed load's request handed to the engine).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pdlaunch.errors import EngineError
from pdlaunch.offload import metrics
from pdlaunch.offload.cpu_tier import CPUBlock, CPUTier
from pdlaunch.offload.transfer import CpuGpuTransfer, TransferResult
from pdlaunch.offload.transfer_spec import TransferSpec

log = logging.getLogger(__name__)


@dataclass
class JobInfo:
    store: bool
    num_blocks: int  # logical blocks
    entries: list[CPUBlock]
    request_id: str | None = None  # a load's request


class OffloadJobs:
    """Submits transfer jobs and accounts each one's outcome, in the offload counters and metrics."""

    def __init__(self, tier: CPUTier, transfer: CpuGpuTransfer,
                 gpu_caches: Callable[[], Sequence[torch.Tensor]]) -> None:
        self.tier = tier
        self.transfer = transfer
        self.gpu_caches = gpu_caches
        self.in_flight: dict[int, JobInfo] = {}  # job id -> what it moves, until polled
        self.storing: dict[int, tuple[CPUBlock, int]] = {}  # block hash -> (CPU block, its store job) until polled
        self._job_ids = itertools.count()
        self._failed_loads: list[tuple[str, str]] = []  # (request id, error) until the engine takes them
        self._unsettled_hits: dict[int, int] = {}  # load job -> its CPU blocks, hits once it did not fail
        self.stored_blocks = 0
        self.loaded_blocks = 0
        self.hit_blocks = 0

    def submit_store(self, entries: list[CPUBlock], spec: TransferSpec) -> None:
        self._submit(JobInfo(True, len(entries), entries), spec)

    def submit_load(self, request_id: str, entries: Sequence[CPUBlock], spec: TransferSpec) -> None:
        """A load for `request_id`; its blocks count as hits once it did not fail (`settle_hits`, `poll`)."""
        job_id = self._submit(JobInfo(False, len(entries), list(entries), request_id), spec)
        self._unsettled_hits[job_id] = len(entries)

    def _submit(self, info: JobInfo, spec: TransferSpec) -> int:
        job_id = next(self._job_ids)
        self.transfer.gpu_caches = list(self.gpu_caches())  # the device cache is re-created after sleep
        if not self.transfer.transfer_async(job_id, spec):
            raise EngineError("the KV offload transfer thread is shut down", field="offload")
        self.in_flight[job_id] = info
        if info.store:
            for entry in info.entries:
                self.storing[entry.block_hash] = (entry, job_id)
        return job_id

    def store_jobs_of(self, entries: Sequence[CPUBlock]) -> list[int]:
        """The store jobs still writing any of `entries` (not polled yet)."""
        return [s[1] for e in entries if (s := self.storing.get(e.block_hash)) is not None and s[0] is e]

    def settle_hits(self) -> None:
        """Every load not failed by now counts its blocks as hits: it was issued, and a device fault later stops
        the engine."""
        for num_blocks in self._unsettled_hits.values():
            self._count_hit(num_blocks)
        self._unsettled_hits.clear()

    def _count_hit(self, num_blocks: int) -> None:
        self.hit_blocks += num_blocks
        metrics.OFFLOAD_HIT_BLOCKS.inc(num_blocks)

    def poll(self) -> None:
        """Account finished jobs. A failed job drops its CPU blocks (a store's never hold their KV, a load's
        may be what broke it) and a failed load's request waits in `take_failed_loads`. A load that failed
        on a CUDA runtime error is fatal (raised once every finished job is accounted): its copies may be
        half done or still running, and the device's next work fails on the same sticky error anyway."""
        fault: str | None = None
        for result in self.transfer.get_finished():
            self._account(result)
            if not result.success and not result.store and result.device_fault and fault is None:
                fault = result.error
        if fault is not None:
            raise EngineError(f"loading KV blocks from the CPU tier failed on the device: {fault}",
                              field="cache.kv_offload_gb", hint="restart the instance; see the log")

    def take_failed_loads(self) -> list[tuple[str, str]]:
        """(request id, error) of each load that failed since the last call: the engine ends those requests
        before the step's compute reads their blocks."""
        failed, self._failed_loads = self._failed_loads, []
        return failed

    def _account(self, result: TransferResult) -> None:
        info = self.in_flight.pop(result.job_id)
        hit = self._unsettled_hits.pop(result.job_id, 0)  # a failed load's blocks are no hit
        direction = "store" if info.store else "load"
        if info.store:
            for entry in info.entries:
                if self.storing.get(entry.block_hash, (None, -1))[1] == result.job_id:
                    del self.storing[entry.block_hash]
        if not result.success:
            log.error("%s of %d KV blocks %s the CPU tier failed%s: %s", direction, info.num_blocks,
                      "to" if info.store else "from", f" (request {info.request_id})" if info.request_id else "",
                      result.error)
            metrics.OFFLOAD_FAILED_JOBS.labels(direction).inc()
            for entry in info.entries:
                self.tier.drop(entry)
            if info.request_id is not None:
                self._failed_loads.append((info.request_id, result.error or "unknown error"))
            return
        if info.store:
            self.stored_blocks += info.num_blocks
            metrics.OFFLOAD_STORED_BLOCKS.inc(info.num_blocks)
        else:
            self.loaded_blocks += info.num_blocks
            metrics.OFFLOAD_LOADED_BLOCKS.inc(info.num_blocks)
            self._count_hit(hit)
        metrics.OFFLOAD_BYTES.labels(direction).inc(result.num_bytes)
        metrics.OFFLOAD_SECONDS.labels(direction).observe(result.seconds)
