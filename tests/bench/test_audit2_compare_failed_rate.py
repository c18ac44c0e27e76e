"""`bench compare` at a rate where every request failed: `bench serve` reports its latencies as 0 (vLLM's JSON
does), which the tables and the per-rate line must not show as 0 ms answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pdlaunch.bench import rate_sweep
from pdlaunch.bench.compare_config import CompareConfig
from pdlaunch.bench.compare_layout import Layout
from pdlaunch.bench.compare_tables import comparison_table, load_table
from pdlaunch.bench.goodput import RatePoint, Slo, rate_point
from pdlaunch.bench.rate_sweep import DeploymentRun, run_deployment
from pdlaunch.bench.report import RequestResult, ServeDoc, calculate_metrics, result_dict
from tests.bench.test_audit_compare_failures import _Ready

LAYOUT = Layout(device="cpu", gpus=[], colocated=2, prefill=1, decode=1)


def _all_failed_doc(n: int = 4) -> ServeDoc:
    results = [RequestResult(success=False, error="HTTP 500: planted") for _ in range(n)]
    return result_dict(calculate_metrics(results, 2.0, {"ttft": 400.0}), results, {})


def _answered_point() -> RatePoint:
    return RatePoint(rate=2.0, num_prompts=4, completed=4, within_slo=4, duration_s=2.0, goodput=2.0, served=2.0,
                     ttft_p50_ms=130.0, ttft_p99_ms=410.0, tpot_p50_ms=13.5, tpot_p99_ms=21.0, itl_p99_ms=8.0)


def test_the_json_keeps_vllms_zeros_and_the_tables_show_a_dash(tmp_path: Path) -> None:
    doc = _all_failed_doc()
    assert doc["completed"] == 0 and doc["median_ttft_ms"] == 0.0  # the JSON stays vLLM-compatible
    failed = rate_point(4.0, doc, Slo(ttft_ms=400, tpot_ms=15))
    runs = [DeploymentRun(kind="colocated", label="colocated", description="2 colocated",
                          points=[_answered_point(), failed])]
    cfg = CompareConfig(model="tiny", rates=[2, 4], out=tmp_path)
    console = Console(width=120, record=True)
    console.print(comparison_table(runs, cfg))
    console.print(load_table(runs, cfg))
    rows = [line.split() for line in console.export_text().splitlines()]
    assert ["2", "colocated", "2.00", "2.00", "130", "410", "13.5", "21.0", "100%"] in rows
    assert ["4", "colocated", "0.00", "0.00", "-", "-", "-", "-", "0%"] in rows
    assert ["4", "colocated", "0.00", "0.00", "-", "-", "-"] in rows  # ITL p99 and no utilisation read


def test_the_per_rate_line_says_no_request_completed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Probe:
        def __init__(self, *_: Any) -> None:
            pass

        def start(self) -> None:
            pass

        def stop(self) -> None:
            return None

        def close(self) -> None:
            pass

    monkeypatch.setattr(rate_sweep, "Deployment", _Ready)
    monkeypatch.setattr(rate_sweep, "LoadProbe", Probe)
    monkeypatch.setattr(rate_sweep, "measure", lambda *_: (None, [], json.loads(json.dumps(_all_failed_doc()))))
    console = Console(record=True, width=300)
    run_deployment(CompareConfig(model="tiny", rates=[2.0], out=tmp_path), LAYOUT, "colocated", console)
    line = next(x for x in console.export_text().splitlines() if "rate 2/s" in x)
    assert "no latencies (no request completed)" in line and "4 of 4 requests failed" in line
    assert "TTFT p50 0 ms" not in line
