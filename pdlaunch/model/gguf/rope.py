"""llama3 rope scaling of a GGUF file: recover transformers' `rope_parameters` from its `rope_freqs` tensor.

llama.cpp's converter stores Llama 3.1/3.2 rope scaling as one factor per rotary frequency
(`rope_freqs.weight`, [head_dim / 2] float32; its rope kernel divides each frequency by its factor) and
keeps the parameters behind them only sometimes (`{arch}.rope.scaling.factor`,
`{arch}.rope.scaling.original_context_length`). The factors follow transformers' llama3 rule:

    wavelen < old_context / high_freq_factor  -> 1
    wavelen > old_context / low_freq_factor   -> factor
    otherwise  1 / ((1 - s) / factor + s),  s = (old_context / wavelen - low) / (high - low)

s is linear in 1 / wavelen, so the frequencies between the two regimes fix (a, b) of s = a / wavelen + b;
any (low, high, old_context) with the same a and b gives the same factors. We pick low = 1 (every Llama 3
release) unless the metadata names old_context, round to the values a config would hold, and accept
only parameters that reproduce every stored factor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pdlaunch.errors import PdlaunchError

FACTOR_RTOL = 1e-4  # rope_freqs are float32; a real mismatch is a different rule, not rounding
_DEFAULT_LOW, _DEFAULT_HIGH = 1.0, 4.0  # Llama 3.1/3.2's low_freq_factor / high_freq_factor


def _wavelengths(head_dim: int, theta: float) -> np.ndarray:
    """[head_dim // 2] float64 wavelengths of the unscaled rotary frequencies, computed as transformers
    computes inv_freq (float32), so the regimes fall where they fall there."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    return 2 * math.pi / inv_freq.astype(np.float64)


def llama3_factors(wavelen: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of the llama3 rule for `params` (transformers' rope_parameters keys)."""
    factor, old = float(params["factor"]), float(params["original_max_position_embeddings"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    smooth = (old / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, medium))


def _params(factor: float, low: float, high: float, old: float) -> dict[str, Any]:
    return {"rope_type": "llama3", "factor": float(factor), "low_freq_factor": float(low),
            "high_freq_factor": float(high), "original_max_position_embeddings": float(old)}


def _rounded(params: dict[str, Any]) -> dict[str, Any]:
    """What a config.json holds: an integer context and short decimals (a fit leaves 8191.9997)."""
    return {**params, "factor": round(params["factor"], 4), "low_freq_factor": round(params["low_freq_factor"], 4),
            "high_freq_factor": round(params["high_freq_factor"], 4),
            "original_max_position_embeddings": int(round(params["original_max_position_embeddings"]))}


def _candidates(wavelen: np.ndarray, stored: np.ndarray, factor: float, old_hint: float | None) -> list[dict[str, Any]]:
    """Parameter sets to try, most likely first (each is verified against every stored factor)."""
    medium = (stored > 1 + FACTOR_RTOL) & (stored < factor * (1 - FACTOR_RTOL))
    found: list[dict[str, Any]] = []
    if medium.sum() >= 2:
        smooth = (1 / stored[medium] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[medium], smooth, 1)  # smooth = a / wavelen + b
        if a > 0 and b < 0:
            if old_hint is not None:
                span = old_hint / a
                found.append(_params(factor, -b * span, -b * span + span, old_hint))
            found.append(_params(factor, _DEFAULT_LOW, _DEFAULT_LOW - 1 / b, -a / b))
    elif old_hint is not None:
        found.append(_params(factor, _DEFAULT_LOW, _DEFAULT_HIGH, old_hint))
    elif medium.sum() == 1:
        point = float((1 / stored[medium][0] - 1 / factor) / (1 - 1 / factor))
        old = float(wavelen[medium][0]) * (point * (_DEFAULT_HIGH - _DEFAULT_LOW) + _DEFAULT_LOW)
        found.append(_params(factor, _DEFAULT_LOW, _DEFAULT_HIGH, old))
    else:  # two regimes only: put old_context in the gap between them
        kept, divided = wavelen[stored <= 1 + FACTOR_RTOL], wavelen[stored > 1 + FACTOR_RTOL]
        lo = float(kept.max()) * _DEFAULT_HIGH if kept.size else 0.0
        hi = float(divided.min()) * _DEFAULT_LOW if divided.size else lo * 2
        found.append(_params(factor, _DEFAULT_LOW, _DEFAULT_HIGH, math.sqrt(max(lo, 1.0) * max(hi, 1.0))))
    return [p for params in found for p in (_rounded(params), params)]


def llama3_rope_parameters(rope_freqs: np.ndarray, head_dim: int, theta: float, factor_hint: float | None = None,
                           old_context_hint: float | None = None) -> dict[str, Any] | None:
    """transformers' llama3 `rope_parameters` (without rope_theta) whose factors equal `rope_freqs`,
    or None when every factor is 1 (no scaling). PdlaunchError when no llama3 parameters fit."""
    stored = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if stored.size != head_dim // 2:
        raise PdlaunchError(f"GGUF tensor rope_freqs has {stored.size} factors, the model's head_dim {head_dim} "
                            f"needs {head_dim // 2}", field="model.path",
                            hint="the file's rope_freqs and attention metadata disagree: re-convert the model")
    if np.allclose(stored, 1.0, rtol=0, atol=FACTOR_RTOL):
        return None
    wavelen = _wavelengths(head_dim, theta)
    factor = float(factor_hint) if factor_hint else float(stored.max())
    for params in _candidates(wavelen, stored, factor, old_context_hint):
        if np.allclose(llama3_factors(wavelen, params), stored, rtol=FACTOR_RTOL, atol=0):
            return params
    raise PdlaunchError("GGUF tensor rope_freqs does not follow llama3 rope scaling (its per-frequency factors "
                        "fit no factor/low_freq_factor/high_freq_factor/original_max_position_embeddings)",
                        field="model.path", hint="pdlaunch reads rope_freqs written by llama.cpp's converter for "
                        "Llama 3.1/3.2; use the model's HF checkpoint directory for other rope variants")
