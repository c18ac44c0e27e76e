"""Ctrl-C during `bench compare`: no report, but the figures of each deployment run that finished stay in
OUT/<kind>.json, and the message names them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pdlaunch.bench import compare
from pdlaunch.bench.cli import bench_app
from pdlaunch.bench.matmul_ceiling import Yardstick
from pdlaunch.bench.rate_sweep import DeploymentRun

ARGS = ["compare", "--model", "tiny", "--device", "cpu", "--rates", "2", "--input-len", "12", "--output-len", "4",
        "--max-model-len", "64"]


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, stop_kind: str) -> None:
    def run_deployment(cfg: Any, layout: Any, kind: str, *_: Any, **__: Any) -> DeploymentRun:
        if kind == stop_kind:
            raise KeyboardInterrupt
        return DeploymentRun(kind=kind, label=kind, description=kind)

    monkeypatch.setattr(compare, "run_deployment", run_deployment)
    monkeypatch.setattr(compare, "prefill_yardstick",
                        lambda *_: Yardstick(input_len=12, flops_per_token=1.0, no_ceiling="not measured here"))


def test_an_interrupted_compare_names_the_runs_it_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    _interrupt_at(monkeypatch, "pd")
    result = CliRunner().invoke(bench_app, [*ARGS, "--out", str(out)])
    assert result.exit_code == 130, result.output
    text = " ".join(result.output.split())
    assert "interrupted: the running deployment was stopped and its processes reaped; no report" in text
    assert f"the figures of the deployment runs that finished are kept: {out / 'colocated.json'}" in text
    assert json.loads((out / "colocated.json").read_text())["kind"] == "colocated"
    assert not (out / "pd.json").exists() and not (out / "compare.json").exists()


def test_an_interrupt_before_any_run_finished_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _interrupt_at(monkeypatch, "colocated")
    result = CliRunner().invoke(bench_app, [*ARGS, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 130, result.output
    assert "no report (no deployment run had finished)" in " ".join(result.output.split())
