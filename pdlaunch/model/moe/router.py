"""The MoE router's top-k: softmax over all experts in float32, the k largest probabilities (best first),
renormalised over those k when asked. One Triton kernel per call on CUDA (one program per token),
torch elsewhere.

At a few tokens the router's own product (hidden -> experts, half a megabyte at Qwen3-30B-A3B) is latency,
not bytes: cuBLAS took ~5 us a layer for it at batch 1 on an H200, split over K and reduced by a second
kernel. `router_logits` computes it in one Triton launch there (many programs, each a few experts' rows;
2.3 us, benchmarks/router_speed.py), and hands larger batches to cuBLAS.

At those batches the MoE block also folds the post-attention RMSNorm (with its residual add) into that launch
(`norm_and_route`): every program normalises its token's row itself (a few KB from L2) and the token's first
program stores it, and the residual stream, for the experts and the next layer. That saves the norm's launch a
layer (Qwen3-30B-A3B shape, one H100, batch 1: 3.33 -> 3.28 ms a step). The top-k stays a launch of its own:
picking it in the last of a token's product programs (an atomic count, as model/split_counters.py's kernels do)
was slower than the launch it saved (3.33-3.36 ms with the norm folded too; benchmarks/RESULTS.md). The norm
rounds where fused_ops.fused_add_rms_norm rounds (fused_ops.normalize_helper); its sum of squares may add in
another order (a different warp count), so a normalised value may differ from that kernel's in its last bit.

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
import torch.nn.functional as F

from pdlaunch.model.fused_ops import fused_available
from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs
from pdlaunch.model.triton_env import interpret_mode

ROUTER_GEMV_MAX_TOKENS = 16  # up to this many tokens the Triton product; more: cuBLAS
NORM_ROUTE_MAX_HIDDEN = 4096  # norm_and_route holds a whole row per program up to this width


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
                            RENORMALIZE: tl.constexpr, LIBDEVICE_EXP: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # pdl.pdl_enabled: wait for the kernel before, then let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
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

    @triton.jit
    def router_gemv_kernel(x_ptr, r_ptr, nw_ptr, y_ptr, res_out_ptr, w_ptr, out_ptr, num_experts, hidden, eps,
                           stride_xt, stride_rt, stride_we, stride_ot, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
                           PDL: tl.constexpr, NORM: tl.constexpr, NORMALIZE: tl.constexpr):
        """logits[t, e] = sum_h x[t, h] * w[e, h] for BLOCK_E experts of one token, float32 sums. With PDL
        (pdl.pdl_enabled) the first BLOCK_H columns of the rows load before the wait for the kernel
        before (the one computing x): no kernel writes router weights. NORM: x is the RMSNorm (weight nw_ptr) of
        x_ptr's row + r_ptr's row (the o projection's output and the residual stream; hidden <= BLOCK_H), computed by
        every program, and stored with the new residual stream by the token's first (y_ptr, res_out_ptr:
        contiguous [T, hidden])."""
        t = tl.program_id(0).to(tl.int64)
        e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        e_ok = e < num_experts
        rows = w_ptr + e[:, None].to(tl.int64) * stride_we
        h = tl.arange(0, BLOCK_H)
        h_ok = h < hidden
        w_first = tl.load(rows + h[None, :], mask=e_ok[:, None] & h_ok[None, :], other=0.0)
        if NORM:
            nw = tl.load(nw_ptr + h, mask=h_ok, other=0.0).to(tl.float32)  # a weight, as the rows
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if NORM:
            dtype = nw_ptr.dtype.element_ty
            o = tl.load(x_ptr + t * stride_xt + h, mask=h_ok, other=0.0)
            r = tl.load(r_ptr + t * stride_rt + h, mask=h_ok, other=0.0)
            s = (o.to(tl.float32) + r.to(tl.float32)).to(dtype)
            x = NORMALIZE(s.to(tl.float32), nw, hidden, eps, dtype)
            if tl.program_id(1) == 0:
                tl.store(res_out_ptr + t * hidden + h, s, mask=h_ok)
                tl.store(y_ptr + t * hidden + h, x.to(dtype), mask=h_ok)
        else:
            x = tl.load(x_ptr + t * stride_xt + h, mask=h_ok, other=0.0).to(tl.float32)
        acc = tl.sum(w_first.to(tl.float32) * x[None, :], axis=1)
        for h0 in range(BLOCK_H, hidden, BLOCK_H):  # (NORM: hidden <= BLOCK_H, no second chunk)
            h = h0 + tl.arange(0, BLOCK_H)
            h_ok = h < hidden
            x = tl.load(x_ptr + t * stride_xt + h, mask=h_ok, other=0.0).to(tl.float32)
            w = tl.load(rows + h[None, :], mask=e_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(out_ptr + t * stride_ot + e, acc.to(out_ptr.dtype.element_ty), mask=e_ok)

    return SimpleNamespace(topk_softmax=topk_softmax_kernel, router_gemv=router_gemv_kernel,
                           next_power_of_2=triton.next_power_of_2, interpret=interpret)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, H] @ weight[E, H]^T -> [T, E] in x's dtype, as F.linear: a Triton launch for at most
    ROUTER_GEMV_MAX_TOKENS tokens on CUDA (or under the interpreter), else cuBLAS / torch."""
    num_tokens = x.shape[0]
    if (not fused_available(x) or weight.dtype != x.dtype or not 0 < num_tokens <= ROUTER_GEMV_MAX_TOKENS
            or weight.stride(1) != 1 or x.stride(1) != 1):
        return F.linear(x, weight)
    return _router_gemv(x, None, None, 0.0, weight)[0]


def norm_route_available(o: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
    """`norm_and_route` folds the norm into the router's product for the o projection's output o [T, H] and the
    residual stream: a decode batch router_logits computes in Triton, whose rows fit one program."""
    return (fused_available(o) and o.dim() == 2 and 0 < o.shape[0] <= ROUTER_GEMV_MAX_TOKENS
            and o.shape[1] <= NORM_ROUTE_MAX_HIDDEN and o.stride(1) == 1 and residual.shape == o.shape
            and residual.dtype == o.dtype and residual.stride(1) == 1 and weight.dtype == o.dtype
            and weight.dim() == 2 and weight.shape[1] == o.shape[1] and weight.stride(1) == 1)


def norm_and_route(o: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                   weight: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The post-attention RMSNorm of o + residual inside the router's product, then `route` (needs
    `norm_route_available`) -> (normed x [T, H], new residual [T, H], weights [T, k] float32, ids [T, k] int64):
    fused_ops.fused_add_rms_norm, router_logits and route, rounded where they round."""
    if not norm_route_available(o, residual, weight):
        raise ValueError(f"norm_and_route: no folded launch for o {tuple(o.shape)} {o.dtype} on {o.device} and a "
                         f"router {tuple(weight.shape)} {weight.dtype} (check norm_route_available first)")
    if norm_weight.shape != (o.shape[1],) or norm_weight.dtype != o.dtype:
        raise ValueError(f"norm_and_route: norm weight {tuple(norm_weight.shape)} {norm_weight.dtype} does not "
                         f"match o {tuple(o.shape)} {o.dtype}")
    logits, y, new_residual = _router_gemv(o, residual, norm_weight.contiguous(), eps, weight)
    assert y is not None and new_residual is not None
    weights, ids = route(logits, top_k, renormalize)
    return y, new_residual, weights, ids


def _router_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
                 weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """router_gemv_kernel's launch -> (logits [T, E] in x's dtype, the normed rows and the new residual with
    `residual`, else None, None)."""
    from pdlaunch.model.fused_kernels import normalize_helper

    kernels = _kernels(interpret_mode())
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    norm = residual is not None
    out = torch.empty(num_tokens, num_experts, dtype=x.dtype, device=x.device)
    y = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device) if norm else None
    new_residual = torch.empty_like(y) if y is not None else None
    # About 32 programs a token (4 experts' rows each at 128 experts, one row each at 8), so the rows are
    # read by many SMs at once; a whole row per load up to 4096 values.
    block_e = max(1, min(4, num_experts // 32))
    block_h = min(4096, kernels.next_power_of_2(hidden))
    pdl = pdl_enabled(x, num_tokens)
    r = residual if residual is not None else x
    kernels.router_gemv[(num_tokens, -(-num_experts // block_e))](
        x, r, norm_weight if norm_weight is not None else x, y if y is not None else x,
        new_residual if new_residual is not None else x, weight, out, num_experts, hidden, eps, x.stride(0),
        r.stride(0), weight.stride(0), out.stride(0), BLOCK_E=block_e, BLOCK_H=block_h, PDL=pdl, NORM=norm,
        NORMALIZE=normalize_helper(), num_warps=4, enable_fp_fusion=False,  # the norm's rounding
        **pdl_kwargs(pdl))
    return out, y, new_residual


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (the router's output) -> (weights [T, k] float32, expert ids [T, k] int64), best first."""
    num_tokens, num_experts = logits.shape
    if not fused_available(logits) or not 0 < top_k <= num_experts:
        return route_torch(logits, top_k, renormalize)
    kernels = _kernels(interpret_mode())
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens:
        pdl = pdl_enabled(logits, num_tokens)
        kernels.topk_softmax[(num_tokens,)](logits, weights, ids, num_experts, logits.stride(0),
                                            TOP_K=top_k, K_PAD=kernels.next_power_of_2(top_k),
                                            E_PAD=kernels.next_power_of_2(num_experts), RENORMALIZE=renormalize,
                                            LIBDEVICE_EXP=not kernels.interpret, PDL=pdl, num_warps=1,
                                            **pdl_kwargs(pdl))
    return weights, ids
