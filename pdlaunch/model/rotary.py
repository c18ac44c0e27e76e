"""Rotary position embedding (HF "rotate_half" convention) with default, linear and llama3 scaling.

cos/sin are computed from the positions at every step, in float32, exactly as HF does (one
product per element, so the results match bit for bit); no [max_positions, head_dim] table. The
model computes them once per step (`cos_sin`) and every layer applies them (`apply`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pdlaunch.model.fused_rotary import apply_rotary, rotary_cos_sin
from pdlaunch.model.rope_config import RopeScaling


def compute_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None,
                     max_position_embeddings: int) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, with the scaling HF applies for rope_type."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling.factor
    if scaling.rope_type == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    assert scaling.low_freq_factor is not None and scaling.high_freq_factor is not None  # RopeScaling checks it
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    old_context = scaling.original_max_position_embeddings or max_position_embeddings
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None,
                 max_position_embeddings: int) -> None:
        super().__init__()
        self.inv_freq: torch.Tensor
        self._args = (head_dim, theta, scaling, max_position_embeddings)
        # On the meta device (the loader builds models there) the values wait for init_buffers: computing them
        # there runs torch's reference ops, whose first use imports torch._dynamo (~2 s of a CPU instance's start).
        shape_only = torch.empty(head_dim // 2, dtype=torch.float32)
        inv_freq = shape_only if shape_only.is_meta else compute_inv_freq(*self._args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_buffers(self) -> None:
        """Recompute inv_freq after the module was materialised from the meta device."""
        self.inv_freq = compute_inv_freq(*self._args).to(self.inv_freq.device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, D] in dtype for `positions` [T]; computed once per step, shared by every layer."""
        return rotary_cos_sin(positions, self.inv_freq, dtype)

    @staticmethod
    def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] (one fused kernel on CUDA); same values as forward."""
        return apply_rotary(q, k, cos, sin)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T]; q: [T, Hq, D], k: [T, Hkv, D] -> rotated (q, k) in their dtype."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.unsqueeze(0)  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos().to(q.dtype).unsqueeze(1)  # [T, 1, D]
        sin = emb.sin().to(q.dtype).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
