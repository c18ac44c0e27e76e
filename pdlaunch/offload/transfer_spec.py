"""What one offload transfer job moves, and where each block of it lies on both sides.

Apart from the transfer itself (transfer.py: a thread, a stream, the jobs' ordering and outcome) because the
addressing is plain block arithmetic that the offload manager builds specs for (stores.py, loads.py) and that a
reader checks by hand, without any device or thread in view.

Addressing. Both sides use the block-major layout of model/attention_metadata.py, one tensor per
KV-cache group: `[num_blocks, layers_in_group, 2, block_size, kv_heads, head_dim]`. A job moves a
request's *logical* blocks (token block j of its sequence) 0..N-1 relative to the job:

- the CPU side (`CPULoadStoreSpec.block_ids`) names one CPU block per `block_size_factor` logical
  blocks; logical block j lives in CPU block `block_ids[j // f]` at sub-block `j % f` (a CPU block
  holds f device blocks, in every group);
- the device side (`GPULoadStoreSpec`) lists, group after group, the device block ids it moves:
  `group_sizes[g]` ids for group g, the first of which is logical block `block_indices[g]`. A
  sliding-window group that only keeps a request's tail starts later than a full-attention group,
  and its start need not be a multiple of f (an unaligned start skips `block_indices[g] % f`
  sub-blocks of its first CPU block and leaves them untouched).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdlaunch.errors import EngineError

__all__ = ["CPULoadStoreSpec", "GPULoadStoreSpec", "TransferSpec", "block_runs", "copy_runs"]


@dataclass(frozen=True)
class GPULoadStoreSpec:
    """Device blocks of every group of one job (see the module docstring for the addressing)."""

    block_ids: tuple[int, ...]  # sum(group_sizes) ids, group 0 first
    group_sizes: tuple[int, ...]  # per group: how many of block_ids belong to it (0 = group not moved)
    block_indices: tuple[int, ...]  # per group: logical block (job-relative) of its first id

    def __post_init__(self) -> None:
        if len(self.group_sizes) != len(self.block_indices):
            raise EngineError(f"{len(self.group_sizes)} group sizes but {len(self.block_indices)} block indices",
                              field="offload.spec", hint="give one block index per KV-cache group")
        if sum(self.group_sizes) != len(self.block_ids) or min(self.group_sizes + self.block_indices, default=0) < 0:
            raise EngineError(f"group sizes {self.group_sizes} do not split {len(self.block_ids)} block ids",
                              field="offload.spec", hint="group_sizes must be >= 0 and sum to len(block_ids)")

    def group_block_ids(self, group: int) -> tuple[int, ...]:
        start = sum(self.group_sizes[:group])
        return self.block_ids[start:start + self.group_sizes[group]]


@dataclass(frozen=True)
class CPULoadStoreSpec:
    block_ids: tuple[int, ...]  # CPU blocks; logical block j of the job is in block_ids[j // factor]


TransferSpec = tuple[GPULoadStoreSpec, CPULoadStoreSpec] | tuple[CPULoadStoreSpec, GPULoadStoreSpec]


def block_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) runs where both sides advance by one: fewer, larger copies."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def copy_runs(gpu: GPULoadStoreSpec, cpu: CPULoadStoreSpec, gpu_caches: Sequence[torch.Tensor],
              cpu_caches: Sequence[torch.Tensor], factor: int) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """Per group: runs of (device block, CPU sub-block, length), every id checked against the caches' sizes
    (`cpu_caches[g]` holds `factor` sub-blocks per CPU block)."""
    if len(gpu.group_sizes) != len(gpu_caches):
        raise EngineError(f"spec has {len(gpu.group_sizes)} groups, the cache {len(gpu_caches)}",
                          field="offload.spec", hint="give group_sizes/block_indices for every group")
    f = factor
    out = []
    for g in range(len(gpu_caches)):
        ids = gpu.group_block_ids(g)
        if not ids:
            continue
        first = gpu.block_indices[g]
        if (first + len(ids) - 1) // f >= len(cpu.block_ids):
            raise EngineError(
                f"group {g}: logical blocks {first}..{first + len(ids) - 1} need "
                f"{(first + len(ids) - 1) // f + 1} CPU blocks, the spec has {len(cpu.block_ids)}",
                field="offload.spec", hint="block_indices + group_sizes must fit the CPU block list")
        subs = [cpu.block_ids[j // f] * f + j % f for j in range(first, first + len(ids))]
        num_gpu, num_cpu = gpu_caches[g].shape[0], cpu_caches[g].shape[0]
        if any(not 0 <= b < num_gpu for b in ids) or any(not 0 <= s < num_cpu for s in subs):
            raise EngineError(f"group {g}: a block id is out of range", field="offload.spec",
                              hint=f"device blocks < {num_gpu}, CPU blocks < {num_cpu // f}")
        out.append((g, block_runs(ids, subs)))
    return out
