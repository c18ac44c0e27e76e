"""`FusedExperts`: one layer's experts as two stacked parameters, sharded for TP or expert parallel.

- w13 [E_local, 2 * I_local, H]: expert e's gate rows (checkpoint gate_proj / w1), then its up rows
  (up_proj / w3);
- w2 [E_local, H, I_local]: its down projection (down_proj / w2).
Tensor parallel (default): every rank holds every expert, rows [r*I/tp, (r+1)*I/tp) of gate and up
and the same columns of down. Expert parallel: rank r holds experts [r*E/tp, (r+1)*E/tp) whole.
Either way each rank returns a partial sum; the MoE block adds the ranks up with one all-reduce.
FP8 checkpoints (or --quantization fp8) on a GPU with FP8 support: `prepare_fp8_blocks` (on the meta
model, before any weight is allocated) makes both fp8 with 128x128 block scales (w13_scale, w2_scale),
and the weight_loaders quantize each expert's shard as it arrives, so the experts never exist in the
model dtype; `to_fp8_blocks` converts experts already loaded (benchmarks' random weights). fused_moe
passes the scales to the kernels.
Each parameter has its own weight_loader, fed one checkpoint tensor per expert (shard ids from
model/moe/names.py); an expert another rank holds is skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from pdlaunch.model.moe.fused import fused_moe
from pdlaunch.model.moe.names import ExpertShard
from pdlaunch.model.quant.config import BLOCK
from pdlaunch.model.quant.fp8 import FP8_DTYPE, quantize_block, quantize_stacked_blocks


def _per_rank(size: int, tp_size: int, what: str) -> int:
    if size % tp_size:
        raise ValueError(f"{what} {size} is not divisible by tp_size {tp_size}")
    return size // tp_size


class FusedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, tp_rank: int = 0, tp_size: int = 1,
                 expert_parallel: bool = False, intermediate_key: str = "moe_intermediate_size") -> None:
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.intermediate_key = intermediate_key  # config.json's name for `intermediate`, for shape messages
        if expert_parallel:
            self.num_local = _per_rank(num_experts, tp_size, "number of experts")
            self.expert_start = tp_rank * self.num_local
            self.inter_local, self.inter_start = intermediate, 0
        else:
            self.num_local, self.expert_start = num_experts, 0
            self.inter_local = _per_rank(intermediate, tp_size, "expert intermediate size")
            self.inter_start = tp_rank * self.inter_local
        self.w13 = nn.Parameter(torch.empty(self.num_local, 2 * self.inter_local, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.num_local, hidden, self.inter_local), requires_grad=False)
        self.w13.weight_loader = self.w13_loader  # type: ignore[attr-defined]
        self.w2.weight_loader = self.w2_loader  # type: ignore[attr-defined]
        self.w13_scale: nn.Parameter | None = None  # set by to_fp8_blocks
        self.w2_scale: nn.Parameter | None = None

    def _local(self, expert: int) -> int | None:
        """The local index of global expert `expert`, None when another rank holds it."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is out of range: the model has {self.num_experts} experts")
        local = expert - self.expert_start
        return local if 0 <= local < self.num_local else None

    def _check(self, loaded: torch.Tensor, expected: tuple[int, int], what: str) -> None:
        if tuple(loaded.shape) != expected:
            raise ValueError(f"shape mismatch for {what}: checkpoint {tuple(loaded.shape)}, model expects {expected} "
                             f"from config.json hidden_size {self.hidden} and {self.intermediate_key} "
                             f"{self.intermediate}")

    def w13_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ExpertShard | None = None) -> None:
        if not isinstance(shard_id, tuple):
            raise ValueError(f"w13 needs a (gate|up, expert) shard id, got {shard_id!r}")
        half, expert = shard_id
        self._check(loaded, (self.intermediate, self.hidden), f"expert {expert} {half} projection")
        local = self._local(expert)
        if local is None:
            return
        offset = 0 if half == "gate" else self.inter_local
        shard = loaded.narrow(0, self.inter_start, self.inter_local)
        if self.w13_scale is not None and param.dtype == FP8_DTYPE:
            shard = self._quantized(shard, self.w13_scale.data[local].narrow(0, offset // BLOCK,
                                                                              self.inter_local // BLOCK))
        param.data[local].narrow(0, offset, self.inter_local).copy_(shard)

    def w2_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ExpertShard | None = None) -> None:
        if not isinstance(shard_id, int):
            raise ValueError(f"w2 needs an expert shard id, got {shard_id!r}")
        self._check(loaded, (self.hidden, self.intermediate), f"expert {shard_id} down projection")
        local = self._local(shard_id)
        if local is None:
            return
        shard = loaded.narrow(1, self.inter_start, self.inter_local)
        if self.w2_scale is not None and param.dtype == FP8_DTYPE:
            shard = self._quantized(shard, self.w2_scale.data[local])
        param.data[local].copy_(shard)

    @staticmethod
    def _quantized(shard: torch.Tensor, scale_out: torch.Tensor) -> torch.Tensor:
        """One expert's shard (blocks aligned: its rows and columns are multiples of 128) as fp8; its
        block scales are written into `scale_out`."""
        q, scale = quantize_block(shard.to(scale_out.device), BLOCK)
        scale_out.copy_(scale)
        return q

    def prepare_fp8_blocks(self) -> bool:
        """On the meta model: hold w13 and w2 as fp8 with 128x128 block scales from the start, each expert's
        shard quantized by the weight_loaders as it loads (the same blocks `to_fp8_blocks` makes, quantized
        from the checkpoint's values instead of their model-dtype rounding). False, and nothing changes,
        when this rank's expert width or the hidden size is not a multiple of 128."""
        if self.w13_scale is not None:
            return True
        if self.inter_local % BLOCK or self.hidden % BLOCK:
            return False
        for name, loader in (("w13", self.w13_loader), ("w2", self.w2_loader)):
            old = getattr(self, name)
            weight = nn.Parameter(torch.empty(old.shape, dtype=FP8_DTYPE, device=old.device), requires_grad=False)
            weight.weight_loader = loader  # type: ignore[attr-defined]
            weight.quantized_on_load = True  # type: ignore[attr-defined]  # takes float tensors (loader.py)
            setattr(self, name, weight)
            experts, rows, cols = old.shape
            scale = nn.Parameter(torch.empty(experts, rows // BLOCK, cols // BLOCK, device=old.device),
                                 requires_grad=False)
            scale.derived = True  # type: ignore[attr-defined]  # written by the loaders, not a checkpoint tensor
            setattr(self, f"{name}_scale", scale)
        return True

    def to_fp8_blocks(self) -> bool:
        """Hold w13 and w2 as fp8 with one scale per 128x128 block of each expert (half the bytes a decode
        step reads; the Triton kernels scale each tile as they load it). False, and nothing changes, when
        this rank's expert width or the hidden size is not a multiple of 128."""
        if self.w13_scale is not None:
            return True
        if self.inter_local % BLOCK or self.hidden % BLOCK:
            return False
        w13, s13 = quantize_stacked_blocks(self.w13.data, BLOCK)
        self.w13 = nn.Parameter(w13, requires_grad=False)
        w2, s2 = quantize_stacked_blocks(self.w2.data, BLOCK)
        self.w2 = nn.Parameter(w2, requires_grad=False)
        self.w13_scale = nn.Parameter(s13, requires_grad=False)
        self.w2_scale = nn.Parameter(s2, requires_grad=False)
        return True

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                summed: bool = True) -> torch.Tensor:
        """x [T, H], routing [T, k] -> this rank's partial sum [T, H] (not yet all-reduced); with `summed` False it
        may instead be the [T, k, H] rows that sum to it (fused_moe)."""
        scales = None if self.w13_scale is None or self.w2_scale is None else (self.w13_scale, self.w2_scale)
        return fused_moe(x, self.w13, self.w2, topk_weights, topk_ids, self.expert_start, scales=scales,
                         num_experts=self.num_experts, summed=summed)
