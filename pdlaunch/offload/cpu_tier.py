"""The CPU tier: KV blocks that left the device prefix cache, kept in host memory.

One region per KV-cache group with the device cache's per-block layout
`[num_blocks, layers_in_group, 2, block_size, kv_heads, head_dim]` (pinned on CUDA hosts so copies
are asynchronous DMA, at exactly their size: offload/pinned_region.py; plain memory on CPU). CPU block
b holds one token block of a prefix in every group at index b; `groups` says which groups hold valid
KV (a sliding-window group may not have had the block any more). Blocks are indexed by the same
chained block hash as the device prefix cache (kvcache/prefix_cache.py) and verified by parent hash
and token ids, so a hash collision is a miss.
Eviction is least recently used (stored or hit), a chain's tail before its head: a prefix lookup stops at
its first miss, so a chain without its first block is useless. `touch` marks a hit's blocks used tail
first, leaving the head the most recent; the manager allocates a store's blocks deepest first likewise.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdlaunch.errors import EngineError
from pdlaunch.kvcache.block_integrity import BlockIntegrityError
from pdlaunch.memory.host_devices import available_memory
from pdlaunch.offload.pinned_region import unpin, zeroed_region

_SIZE_HINT = "lower --kv-offload-gb to what the host can spare next to the model, or 0 to turn offload off"


@dataclass
class CPUBlock:
    block_id: int
    block_hash: int
    parent_hash: int | None
    token_ids: tuple[int, ...]
    groups: frozenset[int]  # groups whose KV this block holds


class CPUTier:
    def __init__(self, num_blocks: int, block_shapes: Sequence[Sequence[int]], dtype: torch.dtype,
                 pin_memory: bool) -> None:
        """`block_shapes[g]`: the device cache's shape without its leading num_blocks dimension."""
        if num_blocks <= 0:
            raise EngineError(f"the CPU offload tier would hold {num_blocks} blocks", field="cache.kv_offload_gb",
                              hint="raise --kv-offload-gb to at least one KV block, or 0 to turn offload off")
        self.num_blocks = num_blocks
        self.pinned = pin_memory
        self.caches = self._allocate(num_blocks, block_shapes, dtype, pin_memory)
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.entries: OrderedDict[int, CPUBlock] = OrderedDict()  # block hash -> block, LRU first
        self.num_evicted = 0

    @classmethod
    def _allocate(cls, num_blocks: int, block_shapes: Sequence[Sequence[int]], dtype: torch.dtype,
                  pin_memory: bool) -> list[torch.Tensor]:
        """One zeroed region per group. Refused before allocating when it exceeds the memory this process may still
        take (host_devices.available_memory: MemAvailable, a cgroup's limit less its usage): zeroing it would get
        the process killed for memory rather than fail (pinned memory is never swapped out)."""
        need, available = num_blocks * cls.bytes_per_block(block_shapes, dtype), available_memory()
        if available is not None and need > available.bytes:
            raise EngineError(f"the CPU offload tier needs {need / 2**30:.2f} GiB of host memory but only "
                              f"{available.bytes / 2**30:.2f} GiB is available ({available.source})",
                              field="cache.kv_offload_gb",
                              hint=f"lower --kv-offload-gb below {available.bytes / 2**30:.2f} (less what else "
                                   "starts on this host), free memory on the host or raise the container's memory "
                                   "limit, or set it to 0 to turn offload off")
        regions: list[torch.Tensor] = []
        try:
            for shape in block_shapes:
                regions.append(zeroed_region(num_blocks, shape, dtype, pin_memory))
            return regions
        except RuntimeError as exc:  # torch.OutOfMemoryError too
            if pin_memory:
                unpin(regions)  # the groups pinned before the failure
            raise EngineError(f"the CPU offload tier of {need / 2**30:.1f} GiB{' pinned' if pin_memory else ''} "
                              f"could not be allocated: {exc}", field="cache.kv_offload_gb", hint=_SIZE_HINT) from exc

    @staticmethod
    def bytes_per_block(block_shapes: Sequence[Sequence[int]], dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return sum(int(torch.Size(shape).numel()) * elem for shape in block_shapes)

    def lookup(self, block_hash: int, parent_hash: int | None, token_ids: tuple[int, ...]) -> CPUBlock | None:
        """The block holding exactly this prefix block; None on a miss. Not marked used: the caller
        touches what it uses, a whole chain at once (`touch`)."""
        entry = self.entries.get(block_hash)
        if entry is None or entry.parent_hash != parent_hash or entry.token_ids != token_ids:
            return None
        return entry

    def touch(self, chain: Sequence[CPUBlock]) -> None:
        """Mark the blocks of a chain (head first, as a prefix reads them) recently used, in reverse:
        the head ends up the most recently used, so eviction takes the chain's tail first (vLLM's
        LRU offloading manager touches a hit in reverse for the same reason). A block no longer
        indexed (dropped, or stored again under a new entry) is skipped."""
        for entry in reversed(chain):
            if self.entries.get(entry.block_hash) is entry:
                self.entries.move_to_end(entry.block_hash)

    def allocate(self, block_hash: int, parent_hash: int | None, token_ids: tuple[int, ...],
                 groups: frozenset[int], protect: frozenset[int] = frozenset()) -> CPUBlock | None:
        """A CPU block for this prefix block: a free one, else the least recently used one whose
        hash is not in `protect`; None when every used block is protected. The caller stores its KV
        before anything can read it (transfers run in submission order)."""
        old = self.entries.pop(block_hash, None)
        if old is not None:
            block_id = old.block_id
        elif self.free:
            block_id = self.free.pop()
        else:
            victim = next((h for h in self.entries if h not in protect), None)
            if victim is None:
                return None
            block_id = self.entries.pop(victim).block_id
            self.num_evicted += 1
        entry = CPUBlock(block_id, block_hash, parent_hash, token_ids, groups)
        self.entries[block_hash] = entry
        return entry

    def drop(self, entry: CPUBlock) -> None:
        """Forget `entry` (its store failed) unless its hash has been stored again since."""
        if self.entries.get(entry.block_hash) is entry:
            del self.entries[entry.block_hash]
            self.free.append(entry.block_id)

    def clear(self) -> None:
        """Forget every block: each goes back to the free list (the weights that computed their KV are gone). Only
        when no job reads or writes the regions (the caller waits for them first)."""
        self.free.extend(entry.block_id for entry in self.entries.values())
        self.entries.clear()

    def release(self) -> None:
        """Unpin the regions (once no copy can touch them: the transfer thread is shut down). Idempotent."""
        if self.pinned:
            self.pinned = False
            unpin(self.caches)

    def num_used_blocks(self) -> int:
        return len(self.entries)

    def check_integrity(self) -> None:
        used = [e.block_id for e in self.entries.values()]
        if len(set(used)) != len(used) or set(used) & set(self.free):
            raise BlockIntegrityError("CPU offload tier: a block is used twice or both used and free")
        if len(used) + len(self.free) != self.num_blocks or any(not 0 <= b < self.num_blocks for b in used):
            raise BlockIntegrityError("CPU offload tier: used and free blocks do not add up")
        for block_hash, e in self.entries.items():
            if e.block_hash != block_hash or not e.groups:
                raise BlockIntegrityError(f"CPU offload tier: block {e.block_id} is indexed wrongly")
