"""The Llama-3-8B figures that benchmarks/limits.py turns into floors (RESULTS.md quotes them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

LIMITS = Path(__file__).resolve().parents[2] / "benchmarks" / "limits.py"


def test_llama3_8b_floors_inputs() -> None:
    spec = importlib.util.spec_from_file_location("bench_limits", LIMITS)
    assert spec is not None and spec.loader is not None
    limits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(limits)
    fig = limits.llama3_8b_figures(prefill_tokens=4096, kv_tokens=8192)
    assert fig["weight_bytes"] == 2 * 8_030_261_248
    linear = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)  # q,o + k,v + gate,up,down
    assert linear == 6_979_321_856
    assert fig["prefill_flops"] == 2 * linear * 4096 + 2 * 4096**2 * 4096 * 32 + 2 * 4096 * 128256
    assert fig["prefill_flops"] / 1e12 == pytest.approx(61.57, abs=0.01)
    assert fig["kv_bytes"] == 2**30  # 32 layers x (k, v) x 8 heads x 128 x 2 bytes x 8192 tokens
