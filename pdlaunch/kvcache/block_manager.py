"""Paged KV cache bookkeeping: free lists, ref counts, prefix caching, sliding-window release.

One `BlockManager` manages every KV-cache group of the model (model/attention_metadata.py): each
group has its own pool of `num_blocks` blocks (its own cache tensor) and each request one block
table per group. A request's tables are allocated and freed together, so a request either holds
what it needs in every group or nothing.

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

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdlaunch.errors import EngineError
from pdlaunch.kvcache.event_log import KvEventLog
from pdlaunch.kvcache.prefix_cache import HashFn, PrefixIndex, PrefixNode, hash_block

__all__ = ["BlockIntegrityError", "BlockManager", "PrefixHit", "hash_block"]


class BlockIntegrityError(EngineError):
    """The block bookkeeping is inconsistent: a bug, never a user error."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="kv_cache", hint="a pdlaunch bug; please report it with the log")


class _GroupPool:
    """Blocks of one KV-cache group."""

    def __init__(self, num_blocks: int, index: PrefixIndex) -> None:
        self.num_blocks = num_blocks
        self.index = index
        self.ref_cnt = [0] * num_blocks
        # Free blocks in reuse order: uncached ones at the front, cached ones appended (LRU).
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.block_node: dict[int, PrefixNode] = {}  # cached block -> the prefix it holds
        self.node_block: dict[PrefixNode, int] = {}  # prefix -> the block caching it in this group
        # Called with (block_id, node) when a cached block is reused, before its KV is overwritten.
        self.on_evict: Callable[[int, PrefixNode], None] | None = None
        self.events: KvEventLog | None = None  # told what enters and leaves the cache (one group's pool)

    def take(self, block_id: int) -> None:
        if self.ref_cnt[block_id] == 0:
            del self.free[block_id]
        self.ref_cnt[block_id] += 1

    def allocate(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        if block_id in self.block_node:
            node = self.block_node.pop(block_id)
            del self.node_block[node]
            if self.events is not None:
                self.events.removed(node.block_hash)
            if self.on_evict is not None:
                self.on_evict(block_id, node)
            self.index.unref(node)
        self.ref_cnt[block_id] = 1
        return block_id

    def release(self, block_id: int) -> None:
        self.ref_cnt[block_id] -= 1
        if self.ref_cnt[block_id] == 0:
            self.free[block_id] = None
            if block_id not in self.block_node:
                self.free.move_to_end(block_id, last=False)

    def cache(self, block_id: int, node: PrefixNode) -> None:
        if block_id in self.block_node or node in self.node_block:
            return  # same content computed twice: the first copy stays the findable one
        self.block_node[block_id] = node
        self.node_block[node] = block_id
        self.index.ref(node)
        if self.events is not None:
            self.events.stored(node.block_hash)


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
        self.pools = [_GroupPool(num_blocks, self.index) for _ in self.sliding_windows]
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
        owners, and the cached-hash index matches the blocks' contents."""
        for g, pool in enumerate(self.pools):
            owners = [0] * self.num_blocks
            for request_id, tables in self.tables.items():
                held = [b for b in tables[g] if b >= 0]
                if len(set(held)) != len(held):
                    raise BlockIntegrityError(f"group {g}: {request_id} holds a block twice: {tables[g]}")
                for b in held:
                    if not 0 <= b < self.num_blocks:
                        raise BlockIntegrityError(f"group {g}: {request_id} holds block {b} out of range")
                    owners[b] += 1
            for b in range(self.num_blocks):
                if (b in pool.free) == (pool.ref_cnt[b] > 0):
                    raise BlockIntegrityError(
                        f"group {g}: block {b} has ref count {pool.ref_cnt[b]} and free={b in pool.free}")
                if pool.ref_cnt[b] != owners[b]:
                    raise BlockIntegrityError(
                        f"group {g}: block {b} has ref count {pool.ref_cnt[b]} but {owners[b]} owners")
            if len(pool.free) + sum(1 for r in pool.ref_cnt if r > 0) != self.num_blocks:
                raise BlockIntegrityError(f"group {g}: free list and owned blocks do not add up")
            for b, node in pool.block_node.items():
                if pool.node_block.get(node) != b:
                    raise BlockIntegrityError(f"group {g}: cached block {b} and its prefix node disagree")
            if len(pool.node_block) != len(pool.block_node):
                raise BlockIntegrityError(f"group {g}: cached-block maps differ in size")
        self._check_events()
        self._check_prefix_index()

    def _check_events(self) -> None:
        cached: dict[int, int] = {}
        for node in self.pools[self.event_group].node_block:
            cached[node.block_hash] = cached.get(node.block_hash, 0) + 1
        if self.events.cached_counts() != cached:
            raise BlockIntegrityError(f"the KV event log names {len(self.events.cached_counts())} cached blocks, "
                                      f"group {self.event_group} caches {len(cached)}")

    def _check_prefix_index(self) -> None:
        for block_hash, bucket in self.index.buckets.items():
            if not bucket or any(n.block_hash != block_hash for n in bucket):
                raise BlockIntegrityError(f"prefix index bucket {block_hash:x} is empty or holds a wrong node")
        live = self.index.nodes()
        expected: dict[PrefixNode, int] = {n: 0 for n in live}
        for pool in self.pools:
            for node in pool.node_block:
                if node not in expected:
                    raise BlockIntegrityError("a cached block refers to a prefix node not in the index")
                expected[node] += 1
        for request_id, chain in self.chains.items():
            for j, node in enumerate(chain):
                if node not in expected or node.parent is not (chain[j - 1] if j else None):
                    raise BlockIntegrityError(f"{request_id}: prefix chain broken at block {j}")
                expected[node] += 1
        for node in live:
            if node.parent is not None:
                if node.parent not in expected:
                    raise BlockIntegrityError("a prefix node's parent left the index before it")
                expected[node.parent] += 1
            if self.index.hash_fn(node.parent.block_hash if node.parent else None, node.token_ids) != node.block_hash:
                raise BlockIntegrityError("a prefix node is indexed under a hash it does not have")
        for node, refs in expected.items():
            if node.refs != refs:
                raise BlockIntegrityError(f"a prefix node has {node.refs} references but {refs} referrers")
