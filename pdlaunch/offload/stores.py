"""Device prefix-cache evictions turned into store jobs to the CPU tier.

The block manager reports a cached free block it reuses (`on_evict`); its KV is still intact, nothing has run
since. `flush` files every such block under its prefix in one CPU block holding each group's copy, and queues
the stores, one job per set of groups. It runs before any load and before the step's compute, and transfers run
in submission order, so a copy always precedes the block's reuse.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pdlaunch.errors import EngineError
from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.kvcache.prefix_cache import PrefixNode
from pdlaunch.offload.cpu_tier import CPUBlock, CPUTier
from pdlaunch.offload.jobs import OffloadJobs
from pdlaunch.offload.transfer_spec import CPULoadStoreSpec, GPULoadStoreSpec

log = logging.getLogger(__name__)


class StoreQueue:
    """The blocks evicted since the last flush, and their store jobs."""

    def __init__(self, block_manager: BlockManager, tier: CPUTier, jobs: OffloadJobs) -> None:
        self.block_manager = block_manager
        self.tier = tier
        self.jobs = jobs
        self._evicted: dict[PrefixNode, dict[int, int]] = {}  # node -> {group: evicted device block}

    def on_evict(self, group: int, block_id: int, node: PrefixNode) -> None:
        self._evicted.setdefault(node, {})[group] = block_id

    @property
    def pending(self) -> bool:
        """Evicted blocks wait for their store to be queued."""
        return bool(self._evicted)

    def clear(self) -> None:
        self._evicted.clear()

    def flush(self, protect: frozenset[int] = frozenset()) -> None:
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
            kept = known.groups if known is not None and node.block_hash not in self.jobs.storing else frozenset()
            entry = self.tier.allocate(node.block_hash, parent, node.token_ids, groups | kept, protect)
            if entry is not None:
                by_groups.setdefault(groups, []).append((entry, blocks))
        for groups, items in by_groups.items():
            # An entry a later allocation of this flush evicted gave its CPU block to that one: storing it too
            # would write the block twice, and another groups' set is another job, which may run last.
            items = [(entry, blocks) for entry, blocks in items if self.tier.entries.get(entry.block_hash) is entry]
            if items:
                self._submit(groups, items)

    def _submit(self, groups: frozenset[int], items: list[tuple[CPUBlock, dict[int, int]]]) -> None:
        """Queue one store job; one that cannot be queued drops its CPU blocks (never written) as a failed
        store does: a lost cache entry, not a lookup that would load what they hold."""
        num_groups = self.block_manager.num_groups
        entries = [entry for entry, _ in items]
        try:
            ids = tuple(blocks[g] for g in range(num_groups) if g in groups for _, blocks in items)
            sizes = tuple(len(items) if g in groups else 0 for g in range(num_groups))
            gpu = GPULoadStoreSpec(ids, sizes, (0,) * num_groups)
            cpu = CPULoadStoreSpec(tuple(entry.block_id for entry in entries))
            self.jobs.submit_store(entries, (gpu, cpu))
        except Exception as exc:  # noqa: BLE001 - a store only fills a cache: drop it, the step goes on
            log.error("queueing a store of %d KV blocks to the CPU tier failed: %s", len(entries), exc,
                      exc_info=not isinstance(exc, EngineError))
            for entry in entries:
                self.tier.drop(entry)


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
