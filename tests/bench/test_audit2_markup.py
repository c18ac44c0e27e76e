"""Text from outside (an error's words, a server's model id, a user's path) printed by `pdlaunch bench ...` goes out as
written: never read as rich markup, where `[/INST]` crashes the print and `[red]` vanishes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from pdlaunch.bench import compare_layout, compare_report
from pdlaunch.bench.cli import bench_app
from pdlaunch.bench.compare_config import CompareConfig
from pdlaunch.bench.compare_layout import Layout, prefill_yardstick
from pdlaunch.bench.compare_tables import prefill_compute_table
from pdlaunch.bench.goodput import RatePoint
from pdlaunch.bench.matmul_ceiling import PrefillShare, Yardstick
from pdlaunch.bench.rate_sweep import DeploymentRun
from pdlaunch.bench.report import RequestResult, calculate_metrics, print_report
from pdlaunch.errors import PdlaunchError
from tests.bench import fake_openai

ODD = "the child said [/INST] and [red]"


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_a_matmul_ceiling_error_is_printed_as_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fails(*_: Any) -> Any:
        raise PdlaunchError(ODD)

    monkeypatch.setattr(compare_layout, "measure_in_child", fails)
    console = Console(record=True, width=300)
    cfg = CompareConfig(model="tiny", rates=[2.0], input_len=12, output_len=4, out=tmp_path)
    yardstick = prefill_yardstick(cfg, Layout(device="cpu", gpus=[], colocated=2, prefill=1, decode=1), console)
    assert f"no matmul ceiling: {ODD};" in console.export_text()
    assert yardstick.no_ceiling == ODD


def test_the_prefill_table_caption_shows_the_error_as_written(tmp_path: Path) -> None:
    yardstick = Yardstick(input_len=12, flops_per_token=2e9, no_ceiling=ODD)
    point = RatePoint(rate=2.0, num_prompts=1, completed=1, within_slo=1, duration_s=1.0, goodput=1.0, served=1.0,
                      ttft_p50_ms=1.0, ttft_p99_ms=1.0, tpot_p50_ms=1.0, tpot_p99_ms=1.0,
                      prefill_compute=PrefillShare(tflops=1.0, of_matmul=None))
    runs = [DeploymentRun(kind="pd", label="PD 1P1D", description="1P + 1D", points=[point])]
    console = Console(record=True, width=300)
    console.print(prefill_compute_table(runs, CompareConfig(model="tiny", rates=[2.0], out=tmp_path), yardstick))
    assert f"matmul ceiling: none ({ODD})" in console.export_text()


def test_the_goodput_row_keeps_its_slos(tmp_path: Path) -> None:
    results = [RequestResult(success=True, prompt_len=4, output_len=2, ttft=0.1, latency=0.2)]
    goodput = {"ttft": 200.0}
    console = Console(record=True, width=200)
    print_report(console, calculate_metrics(results, 1.0, goodput), results, goodput)
    assert "Request goodput (req/s) [ttft <= 200 ms]" in console.export_text()


@pytest.mark.parametrize("multi_turn", [False, True])
def test_a_model_id_and_a_result_path_are_printed_as_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             multi_turn: bool) -> None:
    monkeypatch.setattr(fake_openai, "MODEL", "llama[/INST]")
    out = tmp_path / "[red]" / "r.json"
    mode = (["--multi-turn", "--num-conversations", "1", "--num-turns", "1", "--endpoint", "/v1/chat/completions"]
            if multi_turn else ["--num-prompts", "2"])
    with fake_openai.fake_server() as (url, _):
        # wide enough that the long temporary path is not wrapped (CI's pytest paths are longer)
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", url, *mode, "--random-input-len", "3",
                                                "--random-output-len", "2", "--result-filename", str(out)],
                                    env={"COLUMNS": "1000"}, terminal_width=1000)
    assert result.exit_code == 0, result.output
    text = _flat(result.output)
    assert "(model llama[/INST])" in text and f"Saved results to {out}" in text
    assert json.loads(out.read_text())["model_id"] == "llama[/INST]"


def test_the_compare_report_names_its_files_as_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_matplotlib() -> None:
        raise PdlaunchError("--plot needs matplotlib, which is not installed")

    monkeypatch.setattr(compare_report, "require_matplotlib", no_matplotlib)
    out = tmp_path / "[red]"
    out.mkdir()
    point = RatePoint(rate=2.0, num_prompts=1, completed=1, within_slo=1, duration_s=1.0, goodput=1.0, served=1.0,
                      ttft_p50_ms=1.0, ttft_p99_ms=1.0, tpot_p50_ms=1.0, tpot_p99_ms=1.0)
    runs = [DeploymentRun(kind="pd", label="PD 1P1D", description="1P + 1D", points=[point])]
    console = Console(record=True, width=300)
    compare_report.report_comparison(console, CompareConfig(model="tiny", rates=[2.0], out=out), runs)
    assert f"Wrote {out / 'compare.json'}" in console.export_text()
