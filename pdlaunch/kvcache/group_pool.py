"""The blocks of one KV-cache group (kvcache/block_manager.py holds one pool per group): ref counts, the free list in
reuse order, and which cached block holds which prefix (kvcache/prefix_cache.py)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from pdlaunch.kvcache.event_log import KvEventLog
from pdlaunch.kvcache.prefix_cache import PrefixIndex, PrefixNode


class GroupPool:
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
