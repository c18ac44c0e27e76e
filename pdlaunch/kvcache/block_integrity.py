"""The block manager's integrity check (BlockManager.check_integrity): every block free xor owned, ref counts equal to
the owners, the cached-block maps and the prefix index agreeing with each other, the KV event log naming what its
group caches. An instance runs it once its engine has been idle a while (server/idle_check.py), tests after their steps.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdlaunch.errors import EngineError
from pdlaunch.kvcache.event_log import KvEventLog
from pdlaunch.kvcache.group_pool import GroupPool
from pdlaunch.kvcache.prefix_cache import PrefixIndex, PrefixNode


class BlockIntegrityError(EngineError):
    """The block bookkeeping is inconsistent: a bug, never a user error."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="kv_cache", hint="a pdlaunch bug; please report it with the log")


def check_blocks(pools: Sequence[GroupPool], tables: dict[str, list[list[int]]], num_blocks: int) -> None:
    """Every block of every group is free xor owned, its ref count equals its owners (the request `tables` holding it),
    and each group's cached-block maps agree."""
    for g, pool in enumerate(pools):
        owners = [0] * num_blocks
        for request_id, request_tables in tables.items():
            held = [b for b in request_tables[g] if b >= 0]
            if len(set(held)) != len(held):
                raise BlockIntegrityError(f"group {g}: {request_id} holds a block twice: {request_tables[g]}")
            for b in held:
                if not 0 <= b < num_blocks:
                    raise BlockIntegrityError(f"group {g}: {request_id} holds block {b} out of range")
                owners[b] += 1
        for b in range(num_blocks):
            if (b in pool.free) == (pool.ref_cnt[b] > 0):
                raise BlockIntegrityError(
                    f"group {g}: block {b} has ref count {pool.ref_cnt[b]} and free={b in pool.free}")
            if pool.ref_cnt[b] != owners[b]:
                raise BlockIntegrityError(
                    f"group {g}: block {b} has ref count {pool.ref_cnt[b]} but {owners[b]} owners")
        if len(pool.free) + sum(1 for r in pool.ref_cnt if r > 0) != num_blocks:
            raise BlockIntegrityError(f"group {g}: free list and owned blocks do not add up")
        for b, node in pool.block_node.items():
            if pool.node_block.get(node) != b:
                raise BlockIntegrityError(f"group {g}: cached block {b} and its prefix node disagree")
        if len(pool.node_block) != len(pool.block_node):
            raise BlockIntegrityError(f"group {g}: cached-block maps differ in size")


def check_events(events: KvEventLog, pool: GroupPool, group: int) -> None:
    """The event log names exactly what `pool` (group number `group`) caches."""
    cached: dict[int, int] = {}
    for node in pool.node_block:
        cached[node.block_hash] = cached.get(node.block_hash, 0) + 1
    if events.cached_counts() != cached:
        raise BlockIntegrityError(f"the KV event log names {len(events.cached_counts())} cached blocks, "
                                  f"group {group} caches {len(cached)}")


def check_prefix_index(index: PrefixIndex, pools: Sequence[GroupPool], chains: dict[str, list[PrefixNode]]) -> None:
    """Each prefix node sits in its hash's bucket under the hash of its tokens, and its ref count equals its
    referrers: the blocks caching it, the request chains through it, its children."""
    for block_hash, bucket in index.buckets.items():
        if not bucket or any(n.block_hash != block_hash for n in bucket):
            raise BlockIntegrityError(f"prefix index bucket {block_hash:x} is empty or holds a wrong node")
    live = index.nodes()
    expected: dict[PrefixNode, int] = {n: 0 for n in live}
    for pool in pools:
        for node in pool.node_block:
            if node not in expected:
                raise BlockIntegrityError("a cached block refers to a prefix node not in the index")
            expected[node] += 1
    for request_id, chain in chains.items():
        for j, node in enumerate(chain):
            if node not in expected or node.parent is not (chain[j - 1] if j else None):
                raise BlockIntegrityError(f"{request_id}: prefix chain broken at block {j}")
            expected[node] += 1
    for node in live:
        if node.parent is not None:
            if node.parent not in expected:
                raise BlockIntegrityError("a prefix node's parent left the index before it")
            expected[node.parent] += 1
        if index.hash_fn(node.parent.block_hash if node.parent else None, node.token_ids) != node.block_hash:
            raise BlockIntegrityError("a prefix node is indexed under a hash it does not have")
    for node, refs in expected.items():
        if node.refs != refs:
            raise BlockIntegrityError(f"a prefix node has {node.refs} references but {refs} referrers")
