"""KV offload for one engine: device prefix-cache evictions go to the CPU tier, prefix hits there
come back into freshly allocated device blocks instead of being recomputed.

Flow inside an engine step:
1. The scheduler allocates blocks; a cached free block that gets reused is reported through the
   block manager's evict hook (`on_evict`). Its KV is still intact: nothing has run since.
2. `flush_stores` turns the evicted prefix blocks into store jobs (every group's copy of a block in
   one CPU block: stores.py). It runs before any load and before the step's compute, and transfers run in
   submission order, so the copy always precedes the block's reuse. A connector about to write a
   request's fresh blocks (a PD decode's load) flushes first too (`before_external_write`).
3. For a waiting request, `match` extends the device prefix hit with consecutive blocks found in
   the CPU tier; after allocation `start_load` moves them (loads.py), all groups in one job, each group's
   device blocks starting at its own `block_indices` entry (a sliding-window group loads only what
   its window still needs, seen from the end of the hit or of a connector's part after it). The
   request is scheduled in the same step from the end of the hit.
4. `before_compute` orders every job before the step's compute (CUDA: stream waits on events).
   A load whose copy raised is reported by then (a job is issued before compute waits for it): its
   CPU blocks are dropped and its request is handed to the engine (`take_failed_loads`; jobs.py), which
   ends it before the compute reads its blocks. A CUDA runtime error stops the engine instead. The loads
   that did not fail count their blocks as tier hits then; a failed load's never count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from pdlaunch.kvcache.block_manager import BlockManager, PrefixHit
from pdlaunch.kvcache.prefix_cache import PrefixNode
from pdlaunch.offload.cpu_tier import CPUTier
from pdlaunch.offload.jobs import OffloadJobs
from pdlaunch.offload.loads import CPUHit, find_cpu_hit, load_spec
from pdlaunch.offload.stores import StoreQueue
from pdlaunch.offload.transfer import CpuGpuTransfer

log = logging.getLogger(__name__)


class OffloadManager:
    def __init__(self, block_manager: BlockManager, gpu_caches: Callable[[], Sequence[torch.Tensor]],
                 kv_offload_gb: float) -> None:
        caches = list(gpu_caches())
        shapes = [tuple(c.shape[1:]) for c in caches]
        dtype = caches[0].dtype
        num_blocks = int(kv_offload_gb * 2**30) // CPUTier.bytes_per_block(shapes, dtype)
        self.block_manager = block_manager
        self.gpu_caches = gpu_caches
        self.tier = CPUTier(num_blocks, shapes, dtype, pin_memory=caches[0].device.type == "cuda")
        self.transfer = CpuGpuTransfer(caches, self.tier.caches)
        self.jobs = OffloadJobs(self.tier, self.transfer, gpu_caches)
        self.stores = StoreQueue(block_manager, self.tier, self.jobs)
        block_manager.set_evict_hook(self.on_evict)
        log.info("KV offload: CPU tier of %d blocks (%.2f GiB%s)", num_blocks,
                 num_blocks * CPUTier.bytes_per_block(shapes, dtype) / 2**30,
                 ", pinned" if caches[0].device.type == "cuda" else "")

    @property
    def stored_blocks(self) -> int:
        return self.jobs.stored_blocks

    @property
    def loaded_blocks(self) -> int:
        return self.jobs.loaded_blocks

    @property
    def hit_blocks(self) -> int:
        return self.jobs.hit_blocks

    # -- stores ----------------------------------------------------------------------------------
    def on_evict(self, group: int, block_id: int, node: PrefixNode) -> None:
        self.stores.on_evict(group, block_id, node)

    def flush_stores(self, protect: frozenset[int] = frozenset()) -> None:
        """Queue store jobs for the blocks evicted since the last flush (StoreQueue.flush)."""
        self.stores.flush(protect)

    def before_external_write(self) -> None:
        """Queue pending stores and order what this thread runs next after them (CUDA: its stream waits
        for every job; CPU: the host does). A connector about to write blocks just allocated calls this
        first: some may be evicted cached blocks whose KV a store has yet to read, and storing what the
        connector wrote would file another prompt's KV under their prefix."""
        self.flush_stores()
        self.transfer.order_before_compute()

    # -- loads -----------------------------------------------------------------------------------
    def match(self, token_ids: Sequence[int], hit: PrefixHit, max_tokens: int) -> CPUHit | None:
        """Extend the device `hit` with CPU blocks (at most `max_tokens` tokens in all), or None."""
        return find_cpu_hit(self.block_manager, self.tier, self.jobs, token_ids, hit, max_tokens)

    def start_load(self, request_id: str, block_ids: Sequence[Sequence[int]], cpu_hit: CPUHit) -> None:
        """Queue the load of `cpu_hit` into the request's tables `block_ids` (just allocated). One that
        fails later is reported by `take_failed_loads`."""
        self.flush_stores(protect=frozenset(b.block_hash for b in cpu_hit.blocks))
        self.jobs.submit_load(request_id, cpu_hit.blocks, load_spec(self.block_manager, block_ids, cpu_hit))

    # -- jobs ------------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No store waiting to be queued and no job unaccounted."""
        return not self.stores.pending and not self.jobs.in_flight

    def before_compute(self) -> None:
        """Queue pending stores, then make the step's compute wait for every job. A load that has not failed by
        then counts its blocks as hits: it was issued, and a device fault later stops the engine."""
        self.flush_stores()
        self.transfer.order_before_compute()
        self.poll()
        self.jobs.settle_hits()

    def poll(self) -> None:
        """Account finished jobs (OffloadJobs.poll: a load's device fault raises)."""
        self.jobs.poll()

    def take_failed_loads(self) -> list[tuple[str, str]]:
        """(request id, error) of each load that failed since the last call: the engine ends those requests
        before the step's compute reads their blocks."""
        return self.jobs.take_failed_loads()

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Queue pending stores and block until every job finished (sleep, tests)."""
        self.flush_stores()
        self.transfer.wait_all(timeout)
        self.poll()

    def forget_all(self, timeout: float = 60.0) -> None:
        """Empty the tier: the KV it holds was computed by weights the model no longer has (a level-2 wake-up
        reloads them from the checkpoint, whose files may hold new ones). Stores not yet queued are dropped,
        every job is waited for (its block is accounted, then freed with the rest), then every block is free."""
        self.stores.clear()
        self.transfer.wait_all(timeout)
        self.poll()
        dropped = self.tier.num_used_blocks()
        self.tier.clear()
        log.info("KV offload: the CPU tier's %d block(s) forgotten: the weights were reloaded", dropped)

    def check_integrity(self) -> None:
        self.tier.check_integrity()

    def shutdown(self) -> None:
        self.stores.clear()
        self.transfer.shutdown()
        self.tier.release()  # after the transfer thread: no copy reads or writes the regions any more
        self.poll()
