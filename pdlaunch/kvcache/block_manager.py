"""Paged KV cache bookkeeping: free lists, ref counts, prefix caching, sliding-window release.

One `BlockManager` manages every KV-cache group of the model (model/attention_metadata.py): each
group has its own pool of `num_blocks` blocks (its own cache tensor; kvcache/group_pool.py) and each
request one block table per group. A request's tables are allocated and freed together, so a request
either holds what it needs in every group or nothing.

Prefix caching (kvcache/prefix_cache.py): a block is registered under its prefix node once all its
positions hold KV. Freed cached blocks stay findable and are reused least-recently-freed first;
freed uncached blocks are reused before any cached one. What enters and leaves the cache of the
first full-attention group is noted in `events` (kvcache/event_log.py), which streams it to the proxy.

Sliding-window groups (window W tokens) keep only the blocks a query can still see: a step whose
first query position is s reads keys from s - W + 1 on, so blocks ending before s - W are released
and their table entries become -1. (One extra position is kept so either window convention, W or
W + 1 visible keys, is safe.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdlaunch.errors import EngineError
from pdlaunch.kvcache.block_integrity import BlockIntegrityError, check_blocks, check_events, check_prefix_index
from pdlaunch.kvcache.event_log import KvEventLog
from pdlaunch.kvcache.group_pool import GroupPool
from pdlaunch.kvcache.prefix_cache import HashFn, PrefixIndex, PrefixNode, hash_block

__all__ = ["BlockManager", "PrefixHit", "hash_block"]


@dataclass
class PrefixHit:
    num_tokens: int  # a multiple of block_size
    block_ids: list[list[int]]  # per group, num_tokens // block_size entries, -1 = outside the window
    nodes: list[PrefixNode]  # prefix node of each of those blocks


class BlockManager:
    """Block tables of every request over all KV-cache groups."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        sliding_windows: Sequence[int | None] = (None,),
        enable_prefix_caching: bool = True,
        hash_fn: HashFn = hash_block,
    ) -> None:
        if num_blocks <= 0:
            raise EngineError(f"the KV cache has {num_blocks} blocks", field="cache.num_gpu_blocks",
                              hint="give the instance more memory or set cache.num_gpu_blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sliding_windows = list(sliding_windows)
        self.enable_prefix_caching = enable_prefix_caching
        self.index = PrefixIndex(hash_fn)
        self.pools = [GroupPool(num_blocks, self.index) for _ in self.sliding_windows]
        self.tables: dict[str, list[list[int]]] = {}
        self.chains: dict[str, list[PrefixNode]] = {}  # prefix nodes of a request's registered blocks
        # KV cache events (GET /v1/kv_events): the blocks a full-attention group caches, which bound any
        # prefix hit (a sliding-window group holds only a prefix's last blocks).
        self.events = KvEventLog()
        self.event_group = next((g for g, w in enumerate(self.sliding_windows) if w is None), 0)
        self.pools[self.event_group].events = self.events

    def set_evict_hook(self, hook: Callable[[int, int, PrefixNode], None] | None) -> None:
        """Call `hook(group, block_id, node)` whenever a cached free block is reused (evicted from
        the prefix cache); its KV is intact until the next model step (KV offload stores it)."""
        for g, pool in enumerate(self.pools):
            pool.on_evict = None if hook is None else (lambda block_id, node, g=g: hook(g, block_id, node))

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.pools)

    def num_free_blocks(self) -> int:
        """Blocks that can still be allocated in the fullest group (cached free blocks count)."""
        return min(len(p.free) for p in self.pools)

    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks()

    def usage(self) -> float:
        return self.num_used_blocks() / self.num_blocks

    def block_ids(self, request_id: str) -> list[list[int]]:
        return [list(t) for t in self.tables.get(request_id, [[] for _ in self.pools])]

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self.tables

    def _first_needed_block(self, group: int, position: int) -> int:
        """Index of the first block a query at `position` can read in `group`."""
        window = self.sliding_windows[group]
        if window is None:
            return 0
        return max(0, (position - window) // self.block_size)

    def match_prefix(self, token_ids: Sequence[int], max_tokens: int) -> PrefixHit:
        """Longest cached prefix (full blocks, at most `max_tokens` tokens) usable in every group."""
        empty = PrefixHit(0, [[] for _ in self.pools], [])
        if not self.enable_prefix_caching:
            return empty
        bs = self.block_size
        chain = self.index.find_chain(list(token_ids), bs, min(max_tokens, len(token_ids)) // bs)
        found: list[list[int | None]] = []
        limit = len(chain)
        for g, pool in enumerate(self.pools):
            row = [pool.node_block.get(node) for node in chain]
            found.append(row)
            if self.sliding_windows[g] is None:
                limit = min(limit, next((j for j, b in enumerate(row) if b is None), len(row)))
        for m in range(limit, 0, -1):
            firsts = [self._first_needed_block(g, m * bs) for g in range(self.num_groups)]
            if all(found[g][j] is not None for g in range(self.num_groups) for j in range(firsts[g], m)):
                ids = [[found[g][j] if j >= firsts[g] else -1 for j in range(m)] for g in range(self.num_groups)]
                return PrefixHit(m * bs, ids, chain[:m])  # type: ignore[arg-type]
        return empty

    # -- allocation ------------------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int, start_position: int, hit: PrefixHit | None = None) -> bool:
        """Grow the request's tables to cover positions [0, num_tokens). All or nothing.

        `start_position` is the first position the next step computes: sliding-window entries that
        no query from there on can see stay -1. `hit` (only for a request without blocks) is taken
        over as the table's first entries. Returns False, changing nothing, when blocks run out.
        """
        tables = self.tables.get(request_id)
        if hit is not None and tables is not None:
            raise BlockIntegrityError(f"prefix hit given for {request_id}, which already holds blocks")
        base = hit.block_ids if hit is not None else tables or [[] for _ in self.pools]
        need_entries = -(-num_tokens // self.block_size)
        plans: list[list[bool]] = []  # per group: for each new entry, whether it needs a block
        for g, pool in enumerate(self.pools):
            first = self._first_needed_block(g, start_position)
            plan = [j >= first for j in range(len(base[g]), need_entries)]
            revived = sum(1 for b in base[g] if b >= 0 and pool.ref_cnt[b] == 0) if hit is not None else 0
            if sum(plan) + revived > len(pool.free):
                return False
            plans.append(plan)
        new_tables = [list(t) for t in base]
        for g, pool in enumerate(self.pools):
            if hit is not None:
                for b in hit.block_ids[g]:
                    if b >= 0:
                        pool.take(b)
            new_tables[g].extend(pool.allocate() if needed else -1 for needed in plans[g])
        self.tables[request_id] = new_tables
        if hit is not None and hit.num_tokens:
            for node in hit.nodes:
                self.index.ref(node)
            self.chains[request_id] = list(hit.nodes)
        self.events.flush()  # the cached blocks these allocations evicted
        return True

    def release_out_of_window(self, request_id: str, start_position: int) -> None:
        """Free sliding-window blocks that no query at `start_position` or later can see."""
        tables = self.tables.get(request_id)
        if tables is None:
            return
        for g, pool in enumerate(self.pools):
            first = min(self._first_needed_block(g, start_position), len(tables[g]))
            for j in range(first):
                if tables[g][j] >= 0:
                    pool.release(tables[g][j])
                    tables[g][j] = -1

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the request's blocks whose every position now holds KV."""
        if not self.enable_prefix_caching or request_id not in self.tables:
            return
        chain = self.chains.setdefault(request_id, [])
        bs = self.block_size
        for j in range(len(chain), num_computed_tokens // bs):
            node = self.index.get_or_add(chain[-1] if chain else None, tuple(token_ids[j * bs:(j + 1) * bs]))
            for g, pool in enumerate(self.pools):
                block_id = self.tables[request_id][g][j]
                if block_id >= 0:
                    pool.cache(block_id, node)
            chain.append(node)
        self.events.flush()

    def free(self, request_id: str) -> None:
        """Give back every block of the request (tail first, so a prefix outlives its tail)."""
        tables = self.tables.pop(request_id, None)
        for node in reversed(self.chains.pop(request_id, [])):
            self.index.unref(node)
        if tables is None:
            return
        for g, pool in enumerate(self.pools):
            for block_id in reversed(tables[g]):
                if block_id >= 0:
                    pool.release(block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (their KV is about to be discarded). Only when idle."""
        if self.tables:
            raise BlockIntegrityError(f"prefix cache reset while {len(self.tables)} request(s) hold blocks")
        for pool in self.pools:
            for node in list(pool.node_block):
                self.index.unref(node)
                if pool.events is not None:
                    pool.events.removed(node.block_hash)
            pool.block_node.clear()
            pool.node_block.clear()
        self.events.flush()

    # -- integrity -------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise BlockIntegrityError unless every block is free xor owned, ref counts equal the
        owners, and the cached-hash index matches the blocks' contents (kvcache/block_integrity.py)."""
        check_blocks(self.pools, self.tables, self.num_blocks)
        check_events(self.events, self.pools[self.event_group], self.event_group)
        check_prefix_index(self.index, self.pools, self.chains)
