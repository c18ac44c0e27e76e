"""RMSNorm over a width split across TP ranks (OLMoE's q_norm/k_norm span all heads of q or k).

Each rank holds its columns of the projection and of the norm weight. The mean of squares needs the
whole width: each rank sums its squares in float32, one all-reduce of [T, 1] adds the ranks, and
columns held by several ranks (KV heads replicated when tp exceeds them) are divided back out.
At tp 1 it is HF's RMSNorm exactly (mean in float32, cast, then scale).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pdlaunch.model.weight_loader import ShardId


class ShardedRMSNorm(nn.Module):
    def __init__(self, full_width: int, local_width: int, offset: int, eps: float, tp_size: int = 1,
                 replicas: int = 1) -> None:
        """`offset`: this rank's first column in the full width; `replicas`: ranks holding each column."""
        super().__init__()
        self.full_width, self.offset, self.eps = full_width, offset, eps
        self.tp_size, self.replicas = tp_size, replicas
        self.weight = nn.Parameter(torch.empty(local_width), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if tuple(loaded.shape) != (self.full_width,):
            raise ValueError(f"shape mismatch for norm weight: checkpoint {tuple(loaded.shape)}, "
                             f"model expects ({self.full_width},)")
        param.data.copy_(loaded.narrow(0, self.offset, param.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, local_width] -> normalised over the full width, [T, local_width]."""
        xf = x.float()
        if self.tp_size == 1:
            variance = xf.pow(2).mean(-1, keepdim=True)
        else:
            squares = xf.pow(2).sum(-1, keepdim=True)
            dist.all_reduce(squares)
            variance = squares / (self.replicas * self.full_width)
        return self.weight * (xf * torch.rsqrt(variance + self.eps)).to(x.dtype)
