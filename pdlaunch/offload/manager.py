"""KV offload for one engine: device prefix-cache evictions go to the CPU tier, prefix hits there
come back into freshly allocated device blocks instead of being recomputed.

Flow inside an engine step:
1. The scheduler allocates blocks; a cached free block that gets reused is reported through the
   block manager's evict hook (`on_evict`). Its KV is still intact: nothing has run since.
2. `flush_stores` turns the evicted prefix blocks into store jobs (every group's copy of a block in
   one CPU block). It runs before any load and before the step's compute, and transfers run in
   submission order, so the copy always precedes the block's reuse. A connector about to write a
   request's fresh blocks (a PD decode's load) flushes first too (`before_external_write`).
3. For a waiting request, `match` extends the device prefix hit with consecutive blocks found in
   the CPU tier; after allocation `start_load` moves them, all groups in one job, each group's
   device blocks starting at its own `block_indices` entry (a sliding-window group loads only what
   its window still needs, seen from the end of the hit or of a connector's part after it). The
   request is scheduled in the same step from the end of the hit.
4. `before_compute` orders every job before the step's compute (CUDA: stream waits on events).
   A load whose copy raised is reported by then (a job is issued before compute waits for it): its
   CPU blocks are dropped and its request is handed to the engine (`take_failed_loads`), which ends
   it before the compute reads its blocks. A CUDA runtime error stops the engine instead. The loads
   that did not fail count their blocks as tier hits then; a failed load's never count.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from pdlaunch.errors import EngineError
from pdlaunch.kvcache.block_manager import BlockManager, PrefixHit
from pdlaunch.kvcache.prefix_cache import PrefixNode
from pdlaunch.offload import metrics
from pdlaunch.offload.cpu_tier import CPUBlock, CPUTier
from pdlaunch.offload.transfer import CpuGpuTransfer, CPULoadStoreSpec, GPULoadStoreSpec, TransferResult

log = logging.getLogger(__name__)


@dataclass
class CPUHit:
    num_tokens: int  # device hit + CPU blocks, a multiple of block_size
    first_block: int  # logical block of blocks[0] (== the device hit's block count)
    blocks: list[CPUBlock]


@dataclass
class _JobInfo:
    store: bool
    num_blocks: int  # logical blocks
    entries: list[CPUBlock]
    request_id: str | None = None  # a load's request


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
        self._evicted: dict[PrefixNode, dict[int, int]] = {}  # node -> {group: evicted device block}
        self._jobs: dict[int, _JobInfo] = {}
        self._storing: dict[int, tuple[CPUBlock, int]] = {}  # block hash -> (CPU block, its store job) until polled
        self._job_ids = itertools.count()
        self._failed_loads: list[tuple[str, str]] = []  # (request id, error) until the engine takes them
        self._unsettled_hits: dict[int, int] = {}  # load job -> its CPU blocks, hits once it did not fail
        self.stored_blocks = 0
        self.loaded_blocks = 0
        self.hit_blocks = 0
        block_manager.set_evict_hook(self.on_evict)
        log.info("KV offload: CPU tier of %d blocks (%.2f GiB%s)", num_blocks,
                 num_blocks * CPUTier.bytes_per_block(shapes, dtype) / 2**30,
                 ", pinned" if caches[0].device.type == "cuda" else "")

    # -- stores ----------------------------------------------------------------------------------
    def on_evict(self, group: int, block_id: int, node: PrefixNode) -> None:
        self._evicted.setdefault(node, {})[group] = block_id

    def flush_stores(self, protect: frozenset[int] = frozenset()) -> None:
        """Queue store jobs for the blocks evicted since the last flush. CPU blocks of `protect`
        hashes are neither evicted to make room nor stored again: a load is about to read them."""
        if not self._evicted:
            return
        evicted, self._evicted = self._evicted, {}
        by_groups: dict[frozenset[int], list[tuple[CPUBlock, dict[int, int]]]] = {}
        # Deepest blocks first: each one allocated (or touched) is the tier's most recently used, so a
        # chain's head ends up newer than its tail and is evicted after it, and when this flush alone
        # overflows the tier its later allocations evict the tails it allocated first, not the heads.
        for node in _deepest_first(evicted):
            blocks = evicted[node]
            # Groups that still cache this prefix block hold the same KV: store them with it.
            for g, pool in enumerate(self.block_manager.pools):
                if g not in blocks and node in pool.node_block:
                    blocks[g] = pool.node_block[node]
            if node.block_hash in protect:
                # A store into it (more groups) would run before the load, and one that failed
                # halfway would leave the load a partial copy.
                continue
            groups = frozenset(blocks)
            parent = node.parent.block_hash if node.parent is not None else None
            known = self.tier.lookup(node.block_hash, parent, node.token_ids)
            if known is not None and known.groups >= groups:
                self.tier.touch([known])  # the device used it since it was stored: as recent as a store
                continue
            # allocate() reuses a known block's CPU block and this store writes only `groups`: the groups
            # it held stay valid there, unless their own store is still queued (it may yet fail).
            kept = known.groups if known is not None and node.block_hash not in self._storing else frozenset()
            entry = self.tier.allocate(node.block_hash, parent, node.token_ids, groups | kept, protect)
            if entry is not None:
                by_groups.setdefault(groups, []).append((entry, blocks))
        for groups, items in by_groups.items():
            # An entry a later allocation of this flush evicted gave its CPU block to that one: storing it too
            # would write the block twice, and another groups' set is another job, which may run last.
            items = [(entry, blocks) for entry, blocks in items if self.tier.entries.get(entry.block_hash) is entry]
            if items:
                self._submit_store(groups, items)

    def _submit_store(self, groups: frozenset[int], items: list[tuple[CPUBlock, dict[int, int]]]) -> None:
        """Queue one store job; one that cannot be queued drops its CPU blocks (never written) as a failed
        store does: a lost cache entry, not a lookup that would load what they hold."""
        num_groups = self.block_manager.num_groups
        entries = [entry for entry, _ in items]
        try:
            ids = tuple(blocks[g] for g in range(num_groups) if g in groups for _, blocks in items)
            sizes = tuple(len(items) if g in groups else 0 for g in range(num_groups))
            gpu = GPULoadStoreSpec(ids, sizes, (0,) * num_groups)
            cpu = CPULoadStoreSpec(tuple(entry.block_id for entry in entries))
            self._submit(_JobInfo(True, len(items), entries), (gpu, cpu))
        except Exception as exc:  # noqa: BLE001 - a store only fills a cache: drop it, the step goes on
            log.error("queueing a store of %d KV blocks to the CPU tier failed: %s", len(entries), exc,
                      exc_info=not isinstance(exc, EngineError))
            for entry in entries:
                self.tier.drop(entry)

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
        bm = self.block_manager
        bs = bm.block_size
        first = hit.num_tokens // bs
        limit = min(max_tokens, len(token_ids)) // bs
        parent = hit.nodes[-1].block_hash if hit.nodes else None
        found: list[CPUBlock] = []
        for j in range(first, limit):
            tokens = tuple(token_ids[j * bs:(j + 1) * bs])
            block_hash = bm.index.hash_fn(parent, tokens)
            entry = self.tier.lookup(block_hash, parent, tokens)
            if entry is None:
                break
            found.append(entry)
            parent = block_hash
        pending = [s[1] for e in found if (s := self._storing.get(e.block_hash)) is not None and s[0] is e]
        if pending:
            # A store still copying may fail, and a load queued behind it would then read what it left:
            # learn its outcome first (poll drops a failed store's blocks), and hit only what it stored.
            self.transfer.wait_issued(pending)
            self.poll()
            found = found[:next((i for i, e in enumerate(found) if self.tier.entries.get(e.block_hash) is not e),
                                len(found))]
        for m in range(first + len(found), first, -1):
            # Every group needs the blocks its window still sees at position m * bs.
            if all(g in found[j - first].groups for g in range(bm.num_groups)
                   for j in range(max(first, bm._first_needed_block(g, m * bs)), m)):
                self.tier.touch(found[:m - first])  # tail first: the hit's head is evicted last
                return CPUHit(m * bs, first, found[:m - first])
        return None

    def start_load(self, request_id: str, block_ids: Sequence[Sequence[int]], cpu_hit: CPUHit) -> None:
        """Queue the load of `cpu_hit` into the request's tables `block_ids` (just allocated). One that
        fails later is reported by `take_failed_loads`."""
        self.flush_stores(protect=frozenset(b.block_hash for b in cpu_hit.blocks))
        bm = self.block_manager
        first, end = cpu_hit.first_block, cpu_hit.num_tokens // bm.block_size
        ids: list[int] = []
        sizes, indices = [], []
        for g in range(bm.num_groups):
            lo = max(first, bm._first_needed_block(g, end * bm.block_size))
            if bm.sliding_windows[g] is not None:
                # A connector's part after the hit moves the window on: allocate left the table -1 before
                # where the request's first computed position reads, and nothing reads those blocks.
                while lo < end and block_ids[g][lo] < 0:
                    lo += 1
            segment = list(block_ids[g][lo:end])
            if any(b < 0 for b in segment):
                raise EngineError(f"group {g}: no device block to load CPU blocks into: {segment}",
                                  field="kv_cache", hint="a pdlaunch bug; please report it with the log")
            ids.extend(segment)
            sizes.append(len(segment))
            indices.append(lo - first)
        gpu = GPULoadStoreSpec(tuple(ids), tuple(sizes), tuple(indices))
        cpu = CPULoadStoreSpec(tuple(b.block_id for b in cpu_hit.blocks))
        job_id = self._submit(_JobInfo(False, len(cpu_hit.blocks), list(cpu_hit.blocks), request_id), (cpu, gpu))
        self._unsettled_hits[job_id] = len(cpu_hit.blocks)

    # -- jobs ------------------------------------------------------------------------------------
    def _submit(self, info: _JobInfo, spec: tuple[GPULoadStoreSpec, CPULoadStoreSpec] |
                tuple[CPULoadStoreSpec, GPULoadStoreSpec]) -> int:
        job_id = next(self._job_ids)
        self.transfer.gpu_caches = list(self.gpu_caches())  # the device cache is re-created after sleep
        if not self.transfer.transfer_async(job_id, spec):
            raise EngineError("the KV offload transfer thread is shut down", field="offload")
        self._jobs[job_id] = info
        if info.store:
            for entry in info.entries:
                self._storing[entry.block_hash] = (entry, job_id)
        return job_id

    @property
    def idle(self) -> bool:
        """No store waiting to be queued and no job unaccounted."""
        return not self._evicted and not self._jobs

    def before_compute(self) -> None:
        """Queue pending stores, then make the step's compute wait for every job. A load that has not failed by
        then counts its blocks as hits: it was issued, and a device fault later stops the engine."""
        self.flush_stores()
        self.transfer.order_before_compute()
        self.poll()
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
        info = self._jobs.pop(result.job_id)
        hit = self._unsettled_hits.pop(result.job_id, 0)  # a failed load's blocks are no hit
        direction = "store" if info.store else "load"
        if info.store:
            for entry in info.entries:
                if self._storing.get(entry.block_hash, (None, -1))[1] == result.job_id:
                    del self._storing[entry.block_hash]
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

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Queue pending stores and block until every job finished (sleep, tests)."""
        self.flush_stores()
        self.transfer.wait_all(timeout)
        self.poll()

    def check_integrity(self) -> None:
        self.tier.check_integrity()

    def shutdown(self) -> None:
        self._evicted.clear()
        self.transfer.shutdown()
        self.tier.release()  # after the transfer thread: no copy reads or writes the regions any more
        self.poll()


def _deepest_first(nodes: Iterable[PrefixNode]) -> list[PrefixNode]:
    """`nodes` by their position in their chain (0: a prompt's first block), deepest first, else in order."""
    depth: dict[PrefixNode | None, int] = {None: -1}  # parents walked once for all of them

    def of(node: PrefixNode | None) -> int:
        path = []
        while node is not None and node not in depth:
            path.append(node)
            node = node.parent
        d = depth[node]
        for n in reversed(path):
            d += 1
            depth[n] = d
        return d

    return sorted(nodes, key=of, reverse=True)
