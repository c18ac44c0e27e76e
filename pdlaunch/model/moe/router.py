"""The MoE router's top-k: softmax over all experts in float32, the k largest probabilities (best first),
renormalised over those k when asked. One Triton kernel per call on CUDA (one program per token),
torch elsewhere.

Every supported family routes this way (Qwen2/Qwen3-MoE, Mixtral, OLMoE): Mixtral's "softmax over the
top-k logits" is the same numbers, since renormalising a softmax's top-k is a softmax over their logits.
On CUDA the torch version is five kernels a layer (softmax, topk, sum, divide, and the cast); at batch 1
of a 48-layer model each is a few microseconds of a step that moves little data, so the kernel replaces
them. Ties between equal probabilities go to the lower expert id. Off CUDA (and with
PDLAUNCH_FUSED_OPS=torch) the torch version runs; under TRITON_INTERPRET=1 the kernel runs on CPU
tensors (tests).
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import torch

from pdlaunch.model.fused_ops import fused_available


def route_torch(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64), best first."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@lru_cache(maxsize=2)
def _kernels(interpret: bool) -> SimpleNamespace:
    """The kernel, decorated in the given interpret mode (the cache key keeps modes apart)."""
    import triton
    import triton.language as tl

    @triton.jit
    def topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, num_experts, stride_t,
                            TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                            RENORMALIZE: tl.constexpr, LIBDEVICE_EXP: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, E_PAD)
        x = tl.load(logits_ptr + t * stride_t + e, mask=e < num_experts, other=float("-inf")).to(tl.float32)
        shifted = x - tl.max(x, axis=0)
        if LIBDEVICE_EXP:  # torch's expf; tl.exp is ex2.approx (the interpreter has no libdevice)
            p = tl.extra.cuda.libdevice.exp(shifted)
        else:
            p = tl.exp(shifted)
        p = p / tl.sum(p, axis=0)
        p = tl.where(e < num_experts, p, -1.0)  # padding never wins
        slot = tl.arange(0, K_PAD)
        weights = tl.zeros([K_PAD], tl.float32)
        ids = tl.zeros([K_PAD], tl.int64)
        for i in tl.static_range(TOP_K):
            best = tl.max(p, axis=0)
            pick = tl.min(tl.where(p == best, e, E_PAD), axis=0)  # the lowest id among equals
            weights = tl.where(slot == i, best, weights)
            ids = tl.where(slot == i, pick.to(tl.int64), ids)
            p = tl.where(e == pick, -1.0, p)
        if RENORMALIZE:
            weights = weights / tl.sum(tl.where(slot < TOP_K, weights, 0.0), axis=0)
        tl.store(weights_ptr + t * TOP_K + slot, weights, mask=slot < TOP_K)
        tl.store(ids_ptr + t * TOP_K + slot, ids, mask=slot < TOP_K)

    return SimpleNamespace(topk_softmax=topk_softmax_kernel, next_power_of_2=triton.next_power_of_2,
                           interpret=interpret)


def _interpret_mode() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (the router's output) -> (weights [T, k] float32, expert ids [T, k] int64), best first."""
    num_tokens, num_experts = logits.shape
    if not fused_available(logits) or not 0 < top_k <= num_experts:
        return route_torch(logits, top_k, renormalize)
    kernels = _kernels(_interpret_mode())
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens:
        kernels.topk_softmax[(num_tokens,)](logits, weights, ids, num_experts, logits.stride(0),
                                            TOP_K=top_k, K_PAD=kernels.next_power_of_2(top_k),
                                            E_PAD=kernels.next_power_of_2(num_experts), RENORMALIZE=renormalize,
                                            LIBDEVICE_EXP=not kernels.interpret, num_warps=1)
    return weights, ids
