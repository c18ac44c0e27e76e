"""Linear layers split over the tensor-parallel group, each parameter with its own `weight_loader`
(weight_loader.py): column-parallel ones split the output dim (one projection, several merged, or q/k/v),
row-parallel ones the input dim and all-reduce their partial sums when tp_size > 1 (a torch.distributed group
must then exist).

Which product runs: a quantized layer's `LinearMethod` (model/quant/linear.py); else one row through the GEMV
(gemv.py), a decode batch through the dependent-launched GEMM where its table has a launch (decode_gemm.py), or
F.linear.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pdlaunch.model.decode_gemm import decode_gemm, decode_gemm_available
from pdlaunch.model.fused_ops import fused_available
from pdlaunch.model.gemv import gemv, gemv_available
from pdlaunch.model.quant.fp8 import Fp8Rows
from pdlaunch.model.weight_loader import ShardId, copy_checked, default_weight_loader, set_loader


def _check_full(loaded: torch.Tensor, expected: tuple[int, ...], name: str) -> None:
    """The checkpoint tensor must have the unsharded size, not merely one that can be narrowed."""
    if tuple(loaded.shape) != expected:
        raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(loaded.shape)}, model expects {expected}")


def _per_rank(size: int, tp_size: int, what: str) -> int:
    """This rank's part of a dimension split over the TP group (it must divide evenly)."""
    if size % tp_size:
        raise ValueError(f"{what} size {size} is not divisible by tp_size {tp_size}")
    return size // tp_size


class LinearMethod(Protocol):
    """How a quantized linear layer multiplies (model/quant/linear.py): y = x W^T (+ bias)."""

    def apply(self, layer: nn.Module, x: torch.Tensor | Fp8Rows, bias: torch.Tensor | None) -> torch.Tensor: ...

    def input_layout(self, layer: nn.Module, rows: int) -> bool | None:
        """For x of `rows` rows: whether the kernel computing x should hand it over as Fp8Rows, scales
        column-major (True) or row-major (False), or as it is (None)."""
        ...


def _matmul(layer: nn.Module, x: torch.Tensor | Fp8Rows, weight: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    method: LinearMethod | None = getattr(layer, "quant_method", None)
    if method is not None:
        return method.apply(layer, x, bias)
    if isinstance(x, Fp8Rows):
        raise TypeError("quantized activations reached a layer without FP8 weights (check fp8_input first)")
    if gemv_available(x, weight):
        return gemv(x, weight, bias)
    if decode_gemm_available(x, weight):  # a decode batch on a device with a measured launch
        return decode_gemm(x, weight, bias)
    return F.linear(x, weight, bias)


def _fp8_input(layer: nn.Module, rows: int) -> bool | None:
    method: LinearMethod | None = getattr(layer, "quant_method", None)
    return None if method is None else method.input_layout(layer, rows)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along the output dim: this rank holds out/tp rows.

    `row_shard(shard_id)` says which rows of the checkpoint tensor land where, so that per-row or
    per-block tensors that follow the weight (FP8 scales) are sharded the same way."""

    quant_method: LinearMethod | None = None  # set by model/quant/linear.py for FP8 weights
    SHARD_KIND = "column"

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.in_features = in_features
        rows = _per_rank(out_features, tp_size, "output")
        self.weight = nn.Parameter(torch.empty(rows, in_features), requires_grad=False)
        set_loader(self.weight, self.weight_loader)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(rows), requires_grad=False)
            set_loader(self.bias, self.weight_loader)

    def row_shard(self, shard_id: ShardId = None) -> tuple[int, int, int, int]:
        """(checkpoint rows, first row taken, rows taken, first row in this rank's weight)."""
        size = self.weight.shape[0]
        return size * self.tp_size, self.tp_rank * size, size, 0

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        full, src, size, dest = self.row_shard(shard_id)
        what = self.shard_label(shard_id)
        _check_full(loaded, (full, *param.shape[1:]), what)
        copy_checked(param.data.narrow(0, dest, size), loaded.narrow(0, src, size), what)

    def shard_label(self, shard_id: ShardId = None) -> str:
        return "column-parallel weight" if shard_id is None else f"{self.SHARD_KIND} shard {shard_id}"

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        return _matmul(self, x, self.weight, self.bias)

    def fp8_input(self, rows: int) -> bool | None:
        """LinearMethod.input_layout of this layer's weights for x of `rows` rows (None without FP8 weights)."""
        return _fp8_input(self, rows)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (e.g. gate and up).

    `output_sizes` are the full (unsharded) sizes; shard_id indexes them. Each rank's weight is
    the concatenation of its shard of every projection.
    """

    SHARD_KIND = "merged"

    def __init__(
        self, in_features: int, output_sizes: list[int], bias: bool, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__(in_features, sum(output_sizes), bias, tp_rank, tp_size)
        self.output_sizes = output_sizes

    def row_shard(self, shard_id: ShardId = None) -> tuple[int, int, int, int]:
        if not isinstance(shard_id, int):
            raise ValueError(f"a merged projection needs its index as shard id, got {shard_id!r}")
        index = shard_id
        size = self.output_sizes[index] // self.tp_size
        return self.output_sizes[index], self.tp_rank * size, size, sum(self.output_sizes[:index]) // self.tp_size


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections in one matmul; shard_id is "q", "k" or "v".

    Query heads split across ranks. KV heads split too when tp divides them; when tp exceeds them
    each KV head is replicated on tp / num_kv_heads consecutive ranks (rank r holds KV head
    r * num_kv_heads // tp), so every rank keeps the KV head its query heads attend to.
    """

    SHARD_KIND = "qkv"

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        if num_heads % tp_size or (num_kv_heads % tp_size and tp_size % num_kv_heads):
            raise ValueError(f"{num_heads} heads / {num_kv_heads} KV heads do not split over tp_size {tp_size}")
        self.head_dim = head_dim
        self.q_heads = num_heads // tp_size
        self.kv_heads = max(1, num_kv_heads // tp_size)  # per rank
        self.kv_head_start = tp_rank * num_kv_heads // tp_size  # first KV head of this rank
        per_rank = (self.q_heads + 2 * self.kv_heads) * head_dim
        super().__init__(hidden, per_rank * tp_size, bias, tp_rank, tp_size)
        self.full_sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}

    def row_shard(self, shard_id: ShardId = None) -> tuple[int, int, int, int]:
        if not isinstance(shard_id, str) or shard_id not in self.full_sizes:
            raise ValueError(f"a qkv projection needs shard id 'q', 'k' or 'v', got {shard_id!r}")
        q, kv = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        dest, size, src = {"q": (0, q, self.tp_rank * q), "k": (q, kv, self.kv_head_start * self.head_dim),
                           "v": (q + kv, kv, self.kv_head_start * self.head_dim)}[shard_id]
        return self.full_sizes[shard_id], src, size, dest


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split along the input dim; partial sums are all-reduced across ranks."""

    quant_method: LinearMethod | None = None  # set by model/quant/linear.py for FP8 weights

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(out_features, _per_rank(in_features, tp_size, "input")),
                                   requires_grad=False)
        set_loader(self.weight, self.weight_loader)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            set_loader(self.bias, default_weight_loader)

    def col_shard(self) -> tuple[int, int]:
        """(first checkpoint column taken, columns taken) of this rank."""
        size = self.weight.shape[1]
        return self.tp_rank * size, size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        src, size = self.col_shard()
        _check_full(loaded, (param.shape[0], size * self.tp_size), "row-parallel weight")
        copy_checked(param, loaded.narrow(1, src, size), "row-parallel weight")

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        # The bias is added once, after the reduction, not once per rank.
        return self._reduced(self.partial(x))

    def partial(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        """This rank's partial product x W_r^T, neither all-reduced nor biased, through the layer's own matmul (an
        FP8 weight's LinearMethod): for a caller that adds it to other partial sums before one all-reduce."""
        return _matmul(self, x, self.weight, None)

    def fp8_input(self, rows: int) -> bool | None:
        """LinearMethod.input_layout of this layer's weights for x of `rows` rows (None without FP8 weights)."""
        return _fp8_input(self, rows)

    def takes_gate_up(self, gate_up: torch.Tensor) -> bool:
        """True when `forward_silu_mul` multiplies silu(gate) * up inside its GEMV (one row, unquantized,
        the fused ops on): the SwiGLU then skips its silu_and_mul launch."""
        return (gate_up.shape[0] == 1 and self.quant_method is None and fused_available(gate_up)
                and gemv_available(gate_up[:, : self.weight.shape[1]], self.weight))

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """forward(silu_and_mul(gate_up)) in one GEMV, bit for bit (check `takes_gate_up` first)."""
        return self._reduced(gemv(gate_up, self.weight, silu_mul=True))

    def _reduced(self, y: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(y)
        return y + self.bias if self.bias is not None else y
