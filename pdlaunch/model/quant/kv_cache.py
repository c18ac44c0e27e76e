"""FP8 KV cache: `cache.kv_cache_dtype` (auto | fp8) and the per-layer k/v scales.

With fp8 the cache tensors are float8_e4m3fn: a key is stored as k / k_scale (clamped to +-448) and
read back as fp8 * k_scale, values likewise with v_scale. Scales come from the checkpoint's
`self_attn.k_scale` / `self_attn.v_scale` tensors (llm-compressor and vLLM FP8-KV checkpoints; older
compressed-tensors' `k_proj.output_scale` and ModelOpt's `k_proj.k_scale` names load as those,
model/checkpoint_tensors.py), else 1.0, and the log warns once (`warn_unscaled`), as vLLM does. Per-head
scales (one per KV head) are refused with fp8. With auto the cache has the model dtype and checkpoint scales are
loaded but not applied (per-head ones are not loaded at all).
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.quant.fp8 import FP8_DTYPE, FP8_MAX

KV_CACHE_DTYPES = ("auto", "fp8")
DEFAULT_KV_SCALE = 1.0

log = logging.getLogger(__name__)


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """auto -> the model dtype; fp8 -> float8_e4m3fn."""
    if name == "auto":
        return model_dtype
    if name == "fp8":
        return FP8_DTYPE
    raise PdlaunchError(f"unknown KV cache dtype {name!r}", field="cache.kv_cache_dtype",
                        hint=f"use one of: {', '.join(KV_CACHE_DTYPES)}")


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_DTYPE


def _scale_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    if loaded.numel() != 1:
        raise ValueError(f"a KV scale is one value, the checkpoint has shape {tuple(loaded.shape)}")
    param.data.copy_(loaded.reshape(()))


def kv_scale_parameter() -> nn.Parameter:
    """A scalar k or v scale that a checkpoint may provide (optional: 1.0 when it does not)."""
    param = nn.Parameter(torch.empty((), dtype=torch.float32), requires_grad=False)
    param.weight_loader = _scale_loader  # type: ignore[attr-defined]
    param.default_value = DEFAULT_KV_SCALE  # type: ignore[attr-defined]
    return param


def warn_unscaled(unscaled_layers: list[int], num_layers: int) -> None:
    """Warn (once per instance: its TP rank 0 calls this) that an fp8 cache stores the k/v of `unscaled_layers`
    with scales of 1.0, the checkpoint having none for them: e4m3 saturates at +-448 and loses precision below
    2^-6, where a calibrated scale would have moved those keys and values into range."""
    if not unscaled_layers:
        return
    which = "any layer" if len(unscaled_layers) == num_layers else \
        f"{len(unscaled_layers)} of its {num_layers} layers (the first: layer {unscaled_layers[0]})"
    log.warning("--kv-cache-dtype fp8: the checkpoint has no k/v scales (self_attn.k_scale / v_scale) for %s, so "
                "those layers' keys and values are stored with scales of 1.0; that may lose accuracy for activations "
                "outside fp8 e4m3's range (magnitudes above 448 saturate, those below 2^-6 lose precision). A "
                "checkpoint with calibrated k/v scales (llm-compressor's kv_cache_scheme) avoids it", which)


def store(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """New k or v [T, H, D] in the cache's dtype (scaled and saturated when it is fp8)."""
    if dtype != FP8_DTYPE:
        return x.to(dtype)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def load(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cached k or v read back in the compute dtype (unscaled when the cache is fp8)."""
    if x.dtype != FP8_DTYPE:
        return x.to(dtype)
    return (x.float() * scale).to(dtype)


def round_trip(x: torch.Tensor, scale: float, cache_dtype: torch.dtype) -> torch.Tensor:
    """x as it reads back from a cache of `cache_dtype` (x itself unless the cache is fp8)."""
    if cache_dtype != FP8_DTYPE:
        return x
    return load(store(x, scale, cache_dtype), scale, x.dtype)


def scales_digest(scales: list[tuple[float, float]]) -> str:
    """Short hash of every layer's (k_scale, v_scale): P and D must quantize the same way."""
    text = ",".join(f"{k!r}:{v!r}" for k, v in scales)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_rows(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """flat[rows] for indices `rows` of any shape into flat's first dimension, in flat's dtype: one index_select
    over rows as flat byte ranges. On CPU advanced indexing was 8x slower (a decode step's 16 x 608 key rows of
    the tiny model: 2.4 ms against 0.29 per gather, most of a CPU decode step)."""
    table = flat.view(flat.shape[0], -1)
    if flat.dtype == FP8_DTYPE:  # the bytes, as write_rows stores them
        return table.view(torch.uint8).index_select(0, rows.reshape(-1)).view(FP8_DTYPE).view(
            *rows.shape, *flat.shape[1:])
    return table.index_select(0, rows.reshape(-1)).view(*rows.shape, *flat.shape[1:])


def write_rows(flat: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, scale: float) -> None:
    """flat[rows] = x stored in flat's dtype (index_copy_ has no fp8 kernel on CPU: copy the bytes)."""
    values = store(x, scale, flat.dtype)
    if flat.dtype == FP8_DTYPE:
        flat.view(torch.uint8).index_copy_(0, rows, values.view(torch.uint8))
    else:
        flat.index_copy_(0, rows, values)
