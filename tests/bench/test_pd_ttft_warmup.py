"""benchmarks/pd_ttft.py measures the TTFT of prompts the deployment has not seen: its warm-up requests must not
send the measured run's prompts, which prefix caching (on by default) would then answer from the cache."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from pdlaunch.bench.serve_config import ServeBenchConfig
from pdlaunch.bench.workload import sample_requests
from tests.helpers.benchmark_scripts import BENCHMARKS, load_benchmark


def _prompts(cfg: ServeBenchConfig) -> list[tuple[int, ...]]:
    """The prompts `bench serve` sends for `cfg` (drawn first from its seed, as serve.py draws them)."""
    requests = sample_requests(cfg, cfg.num_prompts, np.random.default_rng(cfg.seed))
    return [tuple(r.prompt) for r in requests]


def test_the_warm_up_sends_none_of_the_measured_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    pd_ttft = load_benchmark(BENCHMARKS / "pd_ttft.py", "_bench_pd_ttft_warmup", monkeypatch)
    sent: list[ServeBenchConfig] = []

    def run(cfg: ServeBenchConfig, console: Console | None = None) -> dict[str, Any]:
        sent.append(cfg)
        return {}

    monkeypatch.setattr(pd_ttft, "run_serve_bench", run)
    args = argparse.Namespace(input_len=64, output_len=4, request_rate=0.5, vocab_size=500, seed=0, num_prompts=12)
    pd_ttft.warm_up("http://127.0.0.1:1", args, Console())
    pd_ttft.measure("http://127.0.0.1:1", args, Console())
    warm, measured = sent
    assert warm.num_prompts == pd_ttft.WARMUP_PROMPTS and measured.num_prompts == 12
    assert measured.seed == args.seed  # the measured workload stays the one --seed names
    assert not set(_prompts(warm)) & set(_prompts(measured))
