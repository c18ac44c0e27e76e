"""The CUDA caching allocator watched while serving: its cache frees, retries and device mallocs.

When the caching allocator finds no free block for a tensor and the device has no memory left to give it, it
frees cached blocks (cudaFree, which waits for the whole device) and tries again: first blocks large enough for the
request, then, failing that, every cached block (a "retry"). Each stalls the step that asked, and a step whose
activations need more than the memory left beside the KV cache (a larger prompt batch than start-up measured, a
new attention workspace) frees and allocates again step after step: the device idles between kernels while the
host waits. A cudaMalloc while serving stalls its step too (~1 ms and up), though less. Serving frees nothing
otherwise: only a sleep or a wake-up empties the cache on purpose, and those re-read the counters (`rebase`).

`AllocatorWatch.poll` reads torch.cuda.memory_stats at most once per POLL_EVERY_S (a read walks the allocator's
counters: ~50 us) and counts what changed since the last read in `pdlaunch_device_cache_frees_total`,
`pdlaunch_device_allocator_retries_total` and `pdlaunch_device_mallocs_total`; frees are logged as a warning (at
most once per LOG_EVERY_S) naming the settings that leave activations more room. Only the engine's own device is
watched (TP rank 0 in a tensor-parallel instance).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import torch
from prometheus_client import Counter

log = logging.getLogger(__name__)

POLL_EVERY_S = 1.0
LOG_EVERY_S = 30.0

CACHE_FREES = Counter(
    "pdlaunch_device_cache_frees", "cudaFree calls of the CUDA caching allocator while serving: cached blocks given "
    "back to the device because a tensor found no memory (each a device-wide wait that stalled a step)")
ALLOCATOR_RETRIES = Counter(
    "pdlaunch_device_allocator_retries", "Times the CUDA caching allocator freed every cached block to find memory "
    "for a tensor and tried again, while serving")
DEVICE_MALLOCS = Counter(
    "pdlaunch_device_mallocs", "cudaMalloc calls the CUDA caching allocator made while serving (each stalls its step)")

Stats = Callable[[], Mapping[str, int]]
_KEYS = ("num_device_free", "num_alloc_retries", "num_device_alloc")


class AllocatorWatch:
    """Counts the allocator's frees, retries and device mallocs since the last poll (module doc). `stats` reads the
    allocator's counters (torch.cuda.memory_stats of the engine's device), `now` is the clock polls are spaced by."""

    def __init__(self, stats: Stats, now: Callable[[], float] = time.monotonic) -> None:
        self._stats, self._now = stats, now
        self._last = self._read()
        self._polled_at = now()
        self._logged_at: float | None = None
        self._unlogged = 0  # frees since the last warning

    def _read(self) -> tuple[int, ...]:
        stats = self._stats()
        return tuple(stats.get(key, 0) for key in _KEYS)

    def rebase(self) -> None:
        """Take the counters as they are now, uncounted: what a sleep or a wake-up freed and allocated on purpose."""
        self._last = self._read()

    def poll(self) -> None:
        now = self._now()
        if now - self._polled_at < POLL_EVERY_S:
            return
        self._polled_at = now
        current = self._read()
        frees, retries, mallocs = (max(0, c - b) for c, b in zip(current, self._last, strict=True))
        self._last = current
        for counter, n in ((CACHE_FREES, frees), (ALLOCATOR_RETRIES, retries), (DEVICE_MALLOCS, mallocs)):
            if n:
                counter.inc(n)
        if frees == 0:
            return
        self._unlogged += frees
        if self._logged_at is not None and now - self._logged_at < LOG_EVERY_S:
            return
        log.warning("the CUDA caching allocator ran short of device memory and freed %d cached block(s) since the "
                    "last report (each a device-wide wait that stalls a step): the KV cache leaves too little "
                    "room for this load's activations; lower --gpu-memory-utilization (cache.gpu_memory_utilization) "
                    "or --max-num-batched-tokens (scheduler.max_num_batched_tokens)", self._unlogged)
        self._unlogged, self._logged_at = 0, now


def allocator_watch(device: torch.device) -> AllocatorWatch | None:
    """A watch of `device`'s caching allocator; None off CUDA."""
    if device.type != "cuda":
        return None
    return AllocatorWatch(lambda: torch.cuda.memory_stats(device))
