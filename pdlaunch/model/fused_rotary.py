"""Rotary position embedding as fused kernels (fused_kernels.py): a step's cos/sin (`rotary_cos_sin`), q and k
rotated (`apply_rotary`), and an attention layer's q/k norm, rotary and KV cache write in one kernel
(`rotary_write_kv`); the torch references where the kernels do not run (fused_ops.py says where)."""

from __future__ import annotations

import torch

from pdlaunch.model.fused_kernels import kernels_for
from pdlaunch.model.fused_norm import rms_norm
from pdlaunch.model.fused_ops import check, fused_available, num_warps, use_triton, write_kv
from pdlaunch.model.fused_reference import apply_rotary_torch, rotary_cos_sin_torch
from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs
from pdlaunch.model.triton_env import interpret_mode


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] (any integer dtype), inv_freq: [D/2] float32 -> cos, sin: [T, D] in dtype; one kernel on CUDA
    where the reference takes seven (a decode step's first ~10 us, H200 trace), equal bit for bit."""
    if (dtype not in (torch.float16, torch.bfloat16, torch.float32) or not use_triton(positions)
            or positions.dim() != 1
            or inv_freq.dtype != torch.float32 or inv_freq.dim() != 1 or not inv_freq.is_contiguous()
            or positions.device != inv_freq.device or positions.stride(0) != 1):
        return rotary_cos_sin_torch(positions, inv_freq, dtype)
    tokens, head_dim = positions.shape[0], 2 * inv_freq.shape[0]
    cos = torch.empty(tokens, head_dim, dtype=dtype, device=positions.device)
    sin = torch.empty(tokens, head_dim, dtype=dtype, device=positions.device)
    if tokens:
        interpret = interpret_mode()
        kernels = kernels_for(interpret)
        kernels.cos_sin[(tokens,)](positions, inv_freq, cos, sin, D=head_dim, D_PAD=kernels.next_power_of_2(head_dim),
                                   LIBDEVICE=not interpret, num_warps=1, enable_fp_fusion=False)
    return cos, sin


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D] (strided views allowed), cos/sin: [T, D] in q's dtype
    -> new contiguous (q_out, k_out)."""
    if not fused_available(q):
        return apply_rotary_torch(q, k, cos, sin)
    tokens, num_q_heads, head_dim = q.shape
    check(k.dtype == q.dtype and k.shape[0] == tokens and k.shape[2] == head_dim and head_dim % 2 == 0, "k",
          f"k {tuple(k.shape)} {k.dtype} does not pair with q {tuple(q.shape)} {q.dtype}",
          "q and k need the same tokens, head_dim (even) and dtype")
    check(cos.shape == (tokens, head_dim) and sin.shape == cos.shape and cos.dtype == q.dtype == sin.dtype,
          "cos", f"cos/sin must be [{tokens}, {head_dim}] in {q.dtype}", "build them with rotary_cos_sin")
    return _rotary_launch(q, k, cos, sin, None, None)


def _rotary_launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   norm: tuple[torch.Tensor, torch.Tensor, float] | None,
                   write: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, tuple[float, float]] | None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary kernel; `norm` (q weight, k weight, eps) and `write` (v, cache, slots, layer, scales) on
    request. Shapes are checked by the callers."""
    kernels = kernels_for(interpret_mode())
    tokens, num_q_heads, head_dim = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    pdl = pdl_enabled(q, tokens)
    npow2 = kernels.next_power_of_2
    q_weight, k_weight, eps = norm if norm is not None else (q, k, 0.0)
    v, cache, slots, layer_in_group, (k_scale, v_scale) = write if write is not None else (k, q, cos, 0, (1.0, 1.0))
    block_size = plane = block_stride = 0
    if write is not None:
        _, layers, _, block_size, _, _ = cache.shape
        plane = block_size * k.shape[1] * head_dim
        block_stride = layers * 2 * plane
    kernels.rotary[(tokens,)](q, k, cos, sin, q_out, k_out, num_q_heads, k.shape[1], *q.stride(), *k.stride(),
                              *cos.stride(), *sin.stride(), q_weight, k_weight, eps, v, *v.stride(), cache, slots,
                              block_size, block_stride, 2 * layer_in_group * plane, k_scale, v_scale,
                              D=head_dim, D_PAD=npow2(head_dim), HQ_PAD=npow2(num_q_heads), HKV_PAD=npow2(k.shape[1]),
                              ROTATE=kernels.rotate_heads, NORM=norm is not None, WRITE_KV=write is not None,
                              FP8=cache.dtype == torch.float8_e4m3fn, PDL=pdl,
                              num_warps=num_warps(npow2(num_q_heads) * head_dim), enable_fp_fusion=False,
                              **pdl_kwargs(pdl))
    return q_out, k_out


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kv_cache: torch.Tensor, slot_mapping: torch.Tensor, layer_in_group: int,
                    kv_scales: tuple[float, float] = (1.0, 1.0),
                    head_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention layer's work between its qkv projection and attention, in one kernel on CUDA:
    `head_norm` (q weight [D], k weight [D], eps: Qwen3's per-head RMSNorm) when given, rotary on q and
    k, and the rotated k with v written into their cache slots (slot < 0: skipped). Same values as
    rms_norm, apply_rotary and write_kv in turn; returns the new contiguous (q, k)."""
    if head_norm is not None:
        check(head_norm[0].shape == head_norm[1].shape == (q.shape[2],) and head_norm[0].dtype == q.dtype,
              "head_norm", f"q/k norm weights must be [{q.shape[2]}] in {q.dtype}",
              "pass the per-head RMSNorm weights")
    fused = fused_available(q) and fused_available(kv_cache) and kv_cache.is_contiguous()
    if fused:
        check(v.shape == k.shape and v.dtype == k.dtype and kv_cache.shape[-2:] == k.shape[1:], "v",
              f"v {tuple(v.shape)} {v.dtype} / cache heads {tuple(kv_cache.shape[-2:])} do not fit k "
              f"{tuple(k.shape)} {k.dtype}", "k and v are [T, num_kv_heads, head_dim], as the cache holds them")
        check(0 <= layer_in_group < kv_cache.shape[1], "layer_in_group",
              f"{layer_in_group} is outside 0..{kv_cache.shape[1] - 1}", "pass the layer's index within its group")
    if not fused:
        if head_norm is not None:
            t, hq, dim = q.shape
            q = rms_norm(q.reshape(-1, dim), head_norm[0], head_norm[2]).view(t, hq, dim)
            k = rms_norm(k.reshape(-1, dim), head_norm[1], head_norm[2]).view(t, k.shape[1], dim)
        q, k = apply_rotary(q, k, cos, sin)
        write_kv(kv_cache, k, v, slot_mapping, layer_in_group, kv_scales)
        return q, k
    tokens, _, head_dim = q.shape
    check(k.dtype == q.dtype and k.shape[0] == tokens and k.shape[2] == head_dim and head_dim % 2 == 0
          and slot_mapping.shape == (tokens,), "k",
          f"k {tuple(k.shape)} {k.dtype} / slots {tuple(slot_mapping.shape)} do not pair with q {tuple(q.shape)}",
          "q and k need the same tokens, head_dim (even) and dtype, one slot per token")
    check(cos.shape == (tokens, head_dim) and sin.shape == cos.shape and cos.dtype == q.dtype == sin.dtype,
          "cos", f"cos/sin must be [{tokens}, {head_dim}] in {q.dtype}", "build them with rotary_cos_sin")
    return _rotary_launch(q, k, cos, sin, head_norm, (v, kv_cache, slot_mapping, layer_in_group, kv_scales))
