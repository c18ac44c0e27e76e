"""Prefix hits in the CPU tier, and the load that brings one back into a request's device blocks.

`find_cpu_hit` extends a waiting request's device prefix hit with the consecutive blocks the tier holds; after
allocation, `load_spec` maps them to the request's fresh device blocks, all groups in one job, each group's
blocks starting at its own `block_indices` entry (a sliding-window group loads only what its window still needs,
seen from the end of the hit or of a connector's part after it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdlaunch.errors import EngineError
from pdlaunch.kvcache.block_manager import BlockManager, PrefixHit
from pdlaunch.offload.cpu_tier import CPUBlock, CPUTier
from pdlaunch.offload.jobs import OffloadJobs
from pdlaunch.offload.transfer_spec import CPULoadStoreSpec, GPULoadStoreSpec


@dataclass
class CPUHit:
    num_tokens: int  # device hit + CPU blocks, a multiple of block_size
    first_block: int  # logical block of blocks[0] (== the device hit's block count)
    blocks: list[CPUBlock]


def find_cpu_hit(bm: BlockManager, tier: CPUTier, jobs: OffloadJobs, token_ids: Sequence[int], hit: PrefixHit,
                 max_tokens: int) -> CPUHit | None:
    """Extend the device `hit` with CPU blocks (at most `max_tokens` tokens in all), or None."""
    bs = bm.block_size
    first = hit.num_tokens // bs
    limit = min(max_tokens, len(token_ids)) // bs
    parent = hit.nodes[-1].block_hash if hit.nodes else None
    found: list[CPUBlock] = []
    for j in range(first, limit):
        tokens = tuple(token_ids[j * bs:(j + 1) * bs])
        block_hash = bm.index.hash_fn(parent, tokens)
        entry = tier.lookup(block_hash, parent, tokens)
        if entry is None:
            break
        found.append(entry)
        parent = block_hash
    pending = jobs.store_jobs_of(found)
    if pending:
        # A store still copying may fail, and a load queued behind it would then read what it left:
        # learn its outcome first (poll drops a failed store's blocks), and hit only what it stored.
        jobs.transfer.wait_issued(pending)
        jobs.poll()
        found = found[:next((i for i, e in enumerate(found) if tier.entries.get(e.block_hash) is not e),
                            len(found))]
    for m in range(first + len(found), first, -1):
        # Every group needs the blocks its window still sees at position m * bs.
        if all(g in found[j - first].groups for g in range(bm.num_groups)
               for j in range(max(first, bm._first_needed_block(g, m * bs)), m)):
            tier.touch(found[:m - first])  # tail first: the hit's head is evicted last
            return CPUHit(m * bs, first, found[:m - first])
    return None


def load_spec(bm: BlockManager, block_ids: Sequence[Sequence[int]],
              hit: CPUHit) -> tuple[CPULoadStoreSpec, GPULoadStoreSpec]:
    """The copy of `hit`'s CPU blocks into the request's tables `block_ids` (just allocated)."""
    first, end = hit.first_block, hit.num_tokens // bm.block_size
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
    cpu = CPULoadStoreSpec(tuple(b.block_id for b in hit.blocks))
    return cpu, gpu
