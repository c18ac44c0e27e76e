"""FP8 e4m3 arithmetic in plain torch (any device): quantize and dequantize weights per output channel
or per 128x128 block, and activations per token (or per token and group of 128 columns).

Scales are float32 and multiply: real value = fp8 value * scale (a block checkpoint's
`weight_scale_inv` is such a multiplier despite its name). Values are clamped to +-448 before the
cast because torch's cast to float8_e4m3fn does not saturate (it would give NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INV_FP8_MAX = float(torch.tensor(1.0) / FP8_MAX)  # float32 1 / 448, as torch's division by a number uses it
_MIN_SCALE = 1e-12  # an all-zero row or block gets this scale instead of 0 (no division by zero)


def weight_dtype_problem(tensor: torch.Tensor) -> tuple[str, str] | None:
    """(what is wrong, how to fix it) for a weight whose dtype pdlaunch cannot load, e.g. ("is int8, not a float
    dtype", ...), or None: an int or a 1-byte float other than e4m3 (e5m2), which no scale makes a weight here."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if not tensor.is_floating_point():
        return (f"is {dtype}, not a float dtype",
                "pdlaunch loads float32/bfloat16/float16 weights and FP8 (e4m3) checkpoints")
    if tensor.element_size() == 1 and tensor.dtype != FP8_DTYPE:
        return f"is {dtype}", "pdlaunch loads FP8 weights in e4m3 (float8_e4m3fn) only"
    return None


def scale_problem(scale: torch.Tensor, positive: bool = False) -> str | None:
    """What makes a checkpoint's scale unusable, or None: a value that is NaN, infinite or negative (quantizers
    write amax / 448), or zero where it is a divisor (`positive`: the KV cache stores k / k_scale). None for a
    meta tensor (check-config without the values) and for a non-float one (the loader names its dtype)."""
    if scale.is_meta or not scale.is_floating_point() or scale.element_size() == 1:
        return None
    values = scale.float().reshape(-1)
    bad = values[~torch.isfinite(values) | ((values <= 0) if positive else (values < 0))]
    if not bad.numel():
        return None
    more = f" (and {bad.numel() - 1} more such values)" if bad.numel() > 1 else ""
    return f"holds {bad[0].item()!r}{more}, but a scale is finite and {'positive' if positive else 'not negative'}"


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to e4m3 (scale broadcasts against x)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] -> (fp8 [O, I], scale [O] float32): one scale per output channel."""
    scale = (w.float().abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)
    return to_fp8(w, scale.unsqueeze(1)), scale


def quantize_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w -> (fp8, scale [] float32)."""
    scale = (w.float().abs().amax() / FP8_MAX).clamp(min=_MIN_SCALE)
    return to_fp8(w, scale), scale


def expand_block_scale(scale: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """Block scale [ceil(rows/b), ceil(cols/b)] -> one scale per element [rows, cols]."""
    return scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


def quantize_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] -> (fp8 [O, I], scale [ceil(O/b), ceil(I/b)] float32): one scale per b x b block."""
    rows, cols = w.shape
    pad = torch.zeros(-(-rows // block) * block, -(-cols // block) * block, dtype=torch.float32, device=w.device)
    pad[:rows, :cols] = w.float().abs()
    blocks = pad.view(pad.shape[0] // block, block, pad.shape[1] // block, block)
    scale = (blocks.amax(dim=(1, 3)) / FP8_MAX).clamp(min=_MIN_SCALE)
    return to_fp8(w, expand_block_scale(scale, rows, cols, block)), scale


def quantize_stacked_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, O, I] (O a multiple of `block`) -> (fp8 [E, O, I], scale [E, O/b, I/b] float32): every expert's
    matrix per block at once. With O a multiple of b the experts stacked row-wise share one block grid."""
    experts, rows, cols = w.shape
    q, scale = quantize_block(w.reshape(experts * rows, cols), block)
    return q.view(experts, rows, cols), scale.view(experts, rows // block, -1)


def dequantize_stacked_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The inverse of `quantize_stacked_blocks`: fp8 [E, O, I] and scale [E, O/b, I/b] -> float32 [E, O, I]."""
    experts, rows, cols = q.shape
    return dequantize(q.reshape(experts * rows, cols), scale.reshape(-1, scale.shape[-1]), block).view(q.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """fp8 [O, I] and its scale (block [O/b, I/b] when `block`, else [O] per channel or [] per tensor)
    -> float32 [O, I]."""
    if block is not None:
        return q.float() * expand_block_scale(scale.float(), q.shape[0], q.shape[1], block)
    if scale.dim() == 1:
        return q.float() * scale.float().unsqueeze(1)
    return q.float() * scale.float()


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (fp8 [T, K], scale [T, 1] float32): dynamic activation scales, one per token."""
    scale = (x.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return to_fp8(x, scale), scale


def quantize_per_token_group(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] (K a multiple of `group`) -> (fp8 [T, K], scale [T, K/group] float32)."""
    t, k = x.shape
    grouped = x.float().view(t, k // group, group)
    scale = (grouped.abs().amax(dim=2) / FP8_MAX).clamp(min=_MIN_SCALE)
    return to_fp8(grouped, scale.unsqueeze(2)).view(t, k), scale


@dataclass(frozen=True)
class Fp8Rows:
    """Activations [M, K] already quantized per row and 128-column group, by the kernel that computed them (an
    RMSNorm, the SwiGLU), for the block-FP8 linear layer that reads them: that layer then skips its own
    quantization launch. The scales lie as the layer's GEMM takes them (quant/gemm.py `fp8_input_layout`)."""

    q: torch.Tensor  # [M, K] fp8
    scales: torch.Tensor  # [M, K / 128] float32; strides (1, M) when `column_major`
    column_major: bool
    dtype: torch.dtype  # the activations' own dtype, the layer's output dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape
