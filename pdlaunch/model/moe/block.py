"""`SparseMoeBlock`: the MLP of an MoE decoder layer (router, experts, optional shared expert).

out = sum over the token's top-k experts of weight * expert(x), plus for Qwen2-MoE
sigmoid(shared_expert_gate(x)) * shared_expert(x). Every rank computes its partial sum (its experts'
share, and its TP share of the shared expert: the per-token gate scales a sum term by term), so one
all-reduce combines the ranks in both TP and expert-parallel mode. The router is replicated.

`route` (model/moe/router.py) is the top-k router every supported family uses: softmax over all experts in
float32, the k largest probabilities, renormalised over those k when `norm_topk_prob` (Mixtral: always).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pdlaunch.model.fused_ops import silu_and_mul
from pdlaunch.model.moe.config import MoeArch
from pdlaunch.model.moe.experts import FusedExperts
from pdlaunch.model.moe.router import norm_and_route, norm_route_available, route, router_logits
from pdlaunch.model.parallel_linear import MergedColumnParallelLinear, RowParallelLinear
from pdlaunch.model.rms_norm import RMSNorm
from pdlaunch.model.weight_loader import default_weight_loader


@dataclass(frozen=True)
class Routed:
    """The MoE block's input x [T, H] with its routing already computed (`SparseMoeBlock.norm_into`)."""

    x: torch.Tensor
    weights: torch.Tensor  # [T, k] float32
    ids: torch.Tensor  # [T, k] int64


class Replicated(nn.Module):
    """A bias-free linear layer every rank holds whole (the router and the shared-expert gate)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SharedExpert(nn.Module):
    """A SwiGLU MLP sharded like the dense one, returning this rank's partial sum (no all-reduce)."""

    def __init__(self, hidden: int, intermediate: int, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate], False, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(intermediate, hidden, False, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # down_proj.partial, not F.linear on its weight: an FP8 down_proj holds fp8 weights on an FP8 GPU
        return self.down_proj.partial(silu_and_mul(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    def __init__(self, moe: MoeArch, hidden: int, tp_rank: int = 0, tp_size: int = 1,
                 expert_parallel: bool = False) -> None:
        super().__init__()
        self.top_k, self.renormalize, self.tp_size = moe.top_k, moe.norm_topk_prob, tp_size
        self.gate = Replicated(hidden, moe.num_experts)
        self.experts = FusedExperts(moe.num_experts, hidden, moe.expert_intermediate_size, tp_rank, tp_size,
                                    expert_parallel, moe.intermediate_key)
        self.shared_expert: SharedExpert | None = None
        self.shared_expert_gate: Replicated | None = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(hidden, moe.shared_expert_intermediate_size, tp_rank, tp_size)
            self.shared_expert_gate = Replicated(hidden, 1)

    def norm_into(self, norm: RMSNorm, o: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor | Routed,
                                                                                         torch.Tensor]:
        """(`norm`(o + residual) as this block reads it, the residual stream after it): at a decode batch the norm
        is folded into the router's product (router.norm_and_route) and the block gets x with its routing."""
        if norm_route_available(o, residual, self.gate.weight):
            x, new_residual, weights, ids = norm_and_route(o, residual, norm.weight, norm.eps, self.gate.weight,
                                                           self.top_k, self.renormalize)
            return Routed(x, weights, ids), new_residual
        normed, new_residual = norm(o, residual)
        return normed, new_residual

    def forward(self, x: torch.Tensor | Routed, summed: bool = True) -> torch.Tensor:
        """x [T, H] (or x routed already: `norm_into`) -> [T, H], summed over the TP group. `summed` False: on one
        rank without a shared expert the result may be the [T, k, H] weighted expert rows whose sum over k it is
        (the decoder's next RMSNorm adds them in its own kernel, fused_ops.fused_add_rms_norm, which saves a launch
        a layer)."""
        if isinstance(x, Routed):
            weights, ids, x = x.weights, x.ids, x.x
        else:
            weights, ids = route(router_logits(x, self.gate.weight), self.top_k, self.renormalize)
        rows_ok = not summed and self.tp_size == 1 and self.shared_expert is None
        out: torch.Tensor = self.experts(x, weights, ids, summed=not rows_ok)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.tp_size > 1:
            dist.all_reduce(out)
        return out
