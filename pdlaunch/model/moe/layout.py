"""How the T*k (token, expert) assignments of one MoE layer are laid out for the grouped GEMMs.

`sort_assignments` orders them by expert (stable); `align_to_blocks` pads each expert's rows up to a
multiple of `block_m` (sentinel M) in a buffer sized from T, k and E alone: at most
cdiv(M, block_m) + min(E, M) blocks, unused ones marked expert -1 (or, for a handful of assignments,
one block each). `combine` sums each token's k
weighted rows. All of it is index arithmetic on the device without a host sync, so it runs inside
CUDA graphs. `TileConfig` is one entry of a per-device tile file (model/moe/configs/).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, TypeVar

import torch

Backend = Literal["reference", "grouped_mm", "triton"]
BACKENDS: tuple[Backend, ...] = ("reference", "grouped_mm", "triton")
V = TypeVar("V", int, bool)


@dataclass(frozen=True)
class TileConfig:
    """One entry of a per-device file: for calls of at most `max_tokens` tokens."""

    max_tokens: int
    backend: Backend
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    fp8_activations: bool = False  # fp8 experts only: quantize activations too, fp8 x fp8 products (W8A8)
    swap_ab: bool = False  # the weight tile is the MMA's long side (block_n >= 64 rows), the block's rows its short
    # fp8 experts only, without fp8_activations: float16 products (activations rounded to float16, clamped into its
    # range; the weights widened exactly), each 128-wide k block's product scaled by the weight block's scale
    f16_products: bool = False
    # The down GEMM's own launch where set (None: the fields above). Its K is the experts' intermediate width (768
    # for Qwen3-30B-A3B: six 128-wide steps) and its N the hidden size, while the gate/up GEMM's N is the
    # intermediate width (at one token 768 / 64 = 12 column tiles an expert, 96 programs for 8 experts): the two
    # may want different tiles. block_m is shared (one row layout for both).
    down_block_n: int | None = None
    down_block_k: int | None = None
    down_num_warps: int | None = None
    down_num_stages: int | None = None
    down_swap_ab: bool | None = None

    def down(self) -> TileConfig:
        """The down GEMM's tile: this one with its down_ fields in place where they are set."""
        return replace(self, block_n=_set(self.down_block_n, self.block_n),
                       block_k=_set(self.down_block_k, self.block_k),
                       num_warps=_set(self.down_num_warps, self.num_warps),
                       num_stages=_set(self.down_num_stages, self.num_stages),
                       swap_ab=_set(self.down_swap_ab, self.swap_ab))


def _set(value: V | None, otherwise: V) -> V:
    return otherwise if value is None else value


@dataclass
class SortedAssignments:
    """The T*k (token, expert) assignments in expert order; dropped ones (bucket E_local) last."""

    order: torch.Tensor  # [M] assignment index (token * k + slot) of each sorted row
    counts: torch.Tensor  # [E_local + 1] assignments per expert (last: dropped)
    expert: torch.Tensor  # [M] expert of each sorted row


def local_expert_ids(topk_ids: torch.Tensor, expert_start: int, num_local: int) -> torch.Tensor:
    """Global expert ids [T, k] -> this rank's local ids; assignments to other ranks' experts -> num_local (a
    bucket no GEMM reads)."""
    local = topk_ids - expert_start
    return torch.where((local >= 0) & (local < num_local), local, num_local)


def sort_assignments(local_ids: torch.Tensor, num_local: int) -> SortedAssignments:
    """Sort the assignments by local expert id (stable: token order inside an expert), sync-free."""
    flat = local_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return SortedAssignments(order=order, counts=counts, expert=flat[order])


def combine(rows: torch.Tensor, order: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """Weighted result rows in sorted order [M, H] -> per token sum of its k rows [T, H]."""
    unsorted = torch.empty_like(rows)
    unsorted[order] = rows
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1)


def align_to_blocks(local_ids: torch.Tensor, num_local: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """local_ids [T, k] (num_local = dropped) -> (rows [B*block_m]: assignment index per padded row, M for
    padding; block_expert [B]: local expert of each block, -1 for unused).

    Few assignments (M <= E / 4, e.g. decode at batch 1-4 of a 128-expert model) rarely share an expert:
    each gets a block of its own, which skips the sort and its dozen small kernels at the same weight
    traffic. Otherwise the sorted layout groups each expert's assignments."""
    num_rows = local_ids.numel()
    device = local_ids.device
    flat = local_ids.reshape(-1)
    if num_rows * 4 <= num_local:
        rows = torch.full((num_rows, block_m), num_rows, dtype=torch.int64, device=device)
        rows[:, 0] = torch.arange(num_rows, device=device)
        return rows.view(-1), torch.where(flat < num_local, flat, -1).to(torch.int32)
    s = sort_assignments(local_ids, num_local)
    counts = s.counts[:num_local]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(s.counts, 0) - s.counts
    num_blocks = -(-num_rows // block_m) + min(num_local, num_rows)
    capacity = num_blocks * block_m
    rank = torch.arange(num_rows, device=device) - start[s.expert]
    kept = s.expert < num_local
    dest = torch.where(kept, padded_start[s.expert.clamp(max=num_local - 1)] + rank, capacity)
    rows = torch.full((capacity + 1,), num_rows, dtype=torch.int64, device=device)
    rows[dest] = s.order
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_local, block_expert, -1).to(torch.int32)
    return rows[:capacity], block_expert
