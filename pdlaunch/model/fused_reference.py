"""The torch references of the fused ops: the model's eager semantics, which the Triton kernels
(fused_kernels.py) reproduce rounding step for rounding step, and what runs where the kernels do not
(`fused_ops.fused_available`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdlaunch.model.quant import kv_cache as fp8_kv


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H], weight: [H] -> [T, H]; HF LlamaRMSNorm."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H] -> (rms_norm(x + residual) [T, H], x + residual [T, H]). x may be [T, k, H] partial
    rows (an MoE layer's weighted expert outputs): their sum over k is the input."""
    if x.dim() == 3:
        x = x.sum(dim=1)
    new_residual = x + residual
    return rms_norm_torch(new_residual, weight, eps), new_residual


def rotary_cos_sin_torch(positions: torch.Tensor, inv_freq: torch.Tensor,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T], inv_freq: [D/2] fp32 -> cos, sin: [T, D] in dtype, as RotaryEmbedding builds them."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.unsqueeze(0)  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D], cos/sin: [T, D] -> rotated (q, k)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] -> silu(gate) * up: [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _kv_rows(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, layer_in_group: int) -> torch.Tensor:
    """[T] row of (block, layer_in_group, k, offset) in kv_cache viewed as [rows, Hkv, D]."""
    _, layers, _, block_size, _, _ = kv_cache.shape
    slots = slot_mapping.long()
    return (slots // block_size) * (layers * 2 * block_size) + 2 * layer_in_group * block_size + slots % block_size


def write_kv_torch(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                   layer_in_group: int, kv_scales: tuple[float, float] = (1.0, 1.0)) -> None:
    """In place: k, v [T, Hkv, D] into their slots of kv_cache; slots < 0 are skipped (host sync)."""
    flat = kv_cache.view(-1, kv_cache.shape[-2], kv_cache.shape[-1])  # [rows, Hkv, D]
    tokens = (slot_mapping >= 0).nonzero().squeeze(-1)
    rows = _kv_rows(kv_cache, slot_mapping, layer_in_group)[tokens]
    fp8_kv.write_rows(flat, rows, k[tokens], kv_scales[0])
    fp8_kv.write_rows(flat, rows + kv_cache.shape[3], v[tokens], kv_scales[1])
