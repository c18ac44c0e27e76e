"""Which KV blocks a load moves, and how runs of them become few large descriptors.

Positions are token positions of the prompt; block i of a group holds positions
[i * block_size, (i + 1) * block_size). With the block-major layout (attention_metadata.py) a block of
all layers of a group is one contiguous byte range, so a run of consecutive block ids on both sides is
one descriptor of `count * block_bytes` bytes: MiB-sized for real models.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pdlaunch.errors import KVTransferError


@dataclass(frozen=True)
class BlockRun:
    """`count` consecutive blocks: local ids [local_start, +count) <-> remote ids [remote_start, +count)."""

    local_start: int
    remote_start: int
    count: int


def needed_block_indices(block_size: int, start_pos: int, num_tokens: int, sliding_window: int | None) -> range:
    """Indices into a block table of the blocks holding positions [start_pos, start_pos + num_tokens).

    For a sliding-window group only the blocks the next computed token can still see are needed:
    positions >= end - window, end being the first position not loaded (the token decode recomputes).
    Blocks before that are never read, so they are not moved.
    """
    if num_tokens <= 0:
        return range(0)
    end = start_pos + num_tokens
    first_pos = start_pos
    if sliding_window is not None:
        first_pos = max(start_pos, end - sliding_window)
    if first_pos >= end:
        return range(0)
    return range(first_pos // block_size, (end - 1) // block_size + 1)


def pair_blocks(
    local_block_ids: list[int], remote_block_ids: list[int], indices: range, group: int
) -> list[tuple[int, int, int]]:
    """(index, local_id, remote_id) for each needed block-table index; -1 (not held) locally is skipped."""
    start, stop = indices.start, indices.stop
    if indices.step == 1 and start < stop <= min(len(local_block_ids), len(remote_block_ids)):
        # No error possible when both tables cover the range and the prefill holds every block: zip the
        # slices (an 8k-token prompt is 512 blocks, and this runs on the engine thread).
        local_ids, remote_ids = local_block_ids[start:stop], remote_block_ids[start:stop]
        if min(remote_ids) >= 0:
            if min(local_ids) >= 0:
                return list(zip(indices, local_ids, remote_ids))
            return [(i, lo, r) for i, lo, r in zip(indices, local_ids, remote_ids) if lo >= 0]
    pairs: list[tuple[int, int, int]] = []
    for i in indices:
        if i >= len(local_block_ids):
            raise KVTransferError(
                f"decode block table of group {group} has {len(local_block_ids)} blocks, load needs block {i}",
                hint="the engine must allocate blocks for the whole prompt before start_load",
            )
        local = local_block_ids[i]
        if local < 0:
            continue
        remote = remote_block_ids[i] if i < len(remote_block_ids) else -1
        if remote < 0:
            raise KVTransferError(
                f"the prefill side does not hold block {i} of group {group} (prompt block table has "
                f"{len(remote_block_ids)} entries), which decode needs",
                hint="prefill and decode must run the same model and block size",
            )
        pairs.append((i, local, remote))
    return pairs


def coalesce(pairs: Iterable[tuple[int, int]]) -> list[BlockRun]:
    """Merge pairs whose local and remote ids both continue the previous run (order kept). One
    BlockRun per run, not per pair: a push of an 8k-token prompt passes 512 pairs through here."""
    runs: list[BlockRun] = []
    local_start = remote_start = count = 0
    for local, remote in pairs:
        if count and local == local_start + count and remote == remote_start + count:
            count += 1
            continue
        if count:
            runs.append(BlockRun(local_start, remote_start, count))
        local_start, remote_start, count = local, remote, 1
    if count:
        runs.append(BlockRun(local_start, remote_start, count))
    return runs


def run_descriptors(
    runs: list[BlockRun], local_base: int, remote_base: int, block_bytes: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(local, remote) lists of (address, length) byte ranges, one per run."""
    local = [(local_base + r.local_start * block_bytes, r.count * block_bytes) for r in runs]
    remote = [(remote_base + r.remote_start * block_bytes, r.count * block_bytes) for r in runs]
    return local, remote
