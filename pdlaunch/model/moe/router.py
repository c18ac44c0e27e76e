"""The top-k router every supported MoE family uses (Qwen2/Qwen3-MoE, Mixtral, OLMoE).

softmax over all experts in float32, the k largest probabilities, renormalised over those k when
`renormalize` (Mixtral always, the others per `norm_topk_prob`). Mixtral's "softmax over the top-k
logits" is the same numbers: renormalising a softmax's top-k is a softmax over their logits.
"""

from __future__ import annotations

import torch


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64), best first."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
