"""`bench compare` when a deployment fails: the error says which deployment (and layout) failed and at what
stage, and the stop line counts the processes that were started even when the start itself failed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from pdlaunch.bench import rate_sweep
from pdlaunch.bench.cli import bench_app
from pdlaunch.bench.compare_config import CompareConfig
from pdlaunch.bench.compare_layout import Layout
from pdlaunch.bench.rate_sweep import run_deployment
from pdlaunch.errors import PdlaunchError

LAYOUT = Layout(device="cpu", gpus=[], colocated=2, prefill=1, decode=1)


class _Child:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.stopped = False

    def poll(self) -> int | None:
        return 0 if self.stopped else None


class _NeverReady:
    """Starts two children, then times out waiting for them, as launcher.Deployment.start does."""

    def __init__(self, cfg: Any, console: Any) -> None:
        self.proxy_url = "http://127.0.0.1:9"
        self.cfg = cfg
        self.plan = SimpleNamespace(instances=[])
        self.children = [_Child(101), _Child(102)]

    def start(self, ready_timeout: float, **_: object) -> bool:
        raise PdlaunchError("not ready after 5s: prefill-0 (loading)", hint="see the logs in /tmp/x")

    def dead_child(self) -> None:
        return None

    def stop(self, drain: bool = True) -> None:
        for child in self.children:
            child.stopped = True


def test_a_deployment_that_does_not_start_is_named_and_its_processes_counted(monkeypatch: pytest.MonkeyPatch,
                                                                              tmp_path: Path) -> None:
    monkeypatch.setattr(rate_sweep, "Deployment", _NeverReady)
    console = Console(record=True, width=200)
    with pytest.raises(PdlaunchError) as info:
        run_deployment(CompareConfig(model="tiny", rates=[2.0], out=tmp_path), LAYOUT, "pd", console)
    text = info.value.render()
    assert "the pd deployment" in text and "1P (CPU) + 1D (CPU)" in text and "did not start" in text
    assert "not ready after 5s: prefill-0 (loading)" in text and "see the logs in /tmp/x" in text
    assert "pd deployment stopped: 2 processes reaped" in console.export_text()


class _Ready(_NeverReady):
    def start(self, ready_timeout: float, **_: object) -> bool:
        return True


def test_a_rate_that_fails_names_the_deployment_and_the_rate_not_a_serve_flag(monkeypatch: pytest.MonkeyPatch,
                                                                              tmp_path: Path) -> None:
    def measure(*_: Any) -> Any:
        raise PdlaunchError("cannot connect to http://127.0.0.1:9", field="--base-url",
                            hint="is the server running and the URL right?")

    monkeypatch.setattr(rate_sweep, "Deployment", _Ready)
    monkeypatch.setattr(rate_sweep, "measure", measure)
    with pytest.raises(PdlaunchError) as info:
        run_deployment(CompareConfig(model="tiny", rates=[2.0, 4.0], out=tmp_path), LAYOUT, "colocated",
                       Console(quiet=True))
    text = info.value.render()
    assert "the colocated deployment" in text and "at rate 2/s" in text and "cannot connect" in text
    assert "--base-url" not in text  # a flag of `bench serve`, which compare has not


def test_the_rate_line_says_how_many_requests_failed_and_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """compare prints no `bench serve` report: without this line a rate whose requests failed shows a low goodput
    and latencies of the few that were answered, with no word of the failures."""
    def measure(*_: Any) -> Any:
        return None, [], {"errors": ["", "HTTP 500: KV transfer failed [/x]", "HTTP 500: KV transfer failed [/x]"],
                          "ttfts": [0.1, 0.0, 0.0], "e2els": [0.2, 0.0, 0.0], "output_lens": [4, 0, 0],
                          "duration": 1.0, "completed": 1, "request_throughput": 1.0, "median_ttft_ms": 100.0,
                          "p99_ttft_ms": 100.0, "median_tpot_ms": 33.0, "p99_tpot_ms": 33.0, "p99_itl_ms": 33.0}

    monkeypatch.setattr(rate_sweep, "Deployment", _Ready)
    monkeypatch.setattr(rate_sweep, "measure", measure)
    console = Console(record=True, width=300)
    run = run_deployment(CompareConfig(model="tiny", rates=[2.0], out=tmp_path), LAYOUT, "pd", console)
    assert run.points[0].completed == 1
    text = " ".join(console.export_text().split())
    assert "2 of 3 requests failed (first: HTTP 500: KV transfer failed [/x])" in text


def test_an_out_path_that_is_a_file_names_out(tmp_path: Path) -> None:
    """Compare has no --log-dir: a --out that cannot hold the logs is said as --out's problem, before any start."""
    afile = tmp_path / "afile"
    afile.write_text("")
    for out in (afile, afile / "sub"):
        result = CliRunner().invoke(bench_app, ["compare", "--model", "tiny", "--device", "cpu", "--rates", "1",
                                                "--input-len", "8", "--output-len", "4", "--out", str(out)])
        assert result.exit_code == 1, result.output
        text = " ".join(result.output.split())
        assert "error: --out:" in text and "--log-dir" not in text


def test_a_rate_whose_warmups_all_failed_points_at_the_logs_not_at_serve_flags(monkeypatch: pytest.MonkeyPatch,
                                                                                tmp_path: Path) -> None:
    """bench serve's hint for it, 'check --model, --endpoint and the server log', named a flag compare has not
    (--endpoint) and one that is the checkpoint here (--model), and no log: the hint is now the deployment's logs."""
    def measure(*_: Any) -> Any:
        raise PdlaunchError("every warmup request failed; first error: HTTP 503: overloaded",
                            hint="check --model, --endpoint and the server log")

    monkeypatch.setattr(rate_sweep, "Deployment", _Ready)
    monkeypatch.setattr(rate_sweep, "measure", measure)
    with pytest.raises(PdlaunchError) as info:
        run_deployment(CompareConfig(model="tiny", rates=[2.0], out=tmp_path), LAYOUT, "colocated",
                       Console(quiet=True))
    text = info.value.render()
    assert "at rate 2/s: every warmup request failed; first error: HTTP 503: overloaded" in text
    assert "--endpoint" not in text and "--model" not in text
    assert f"(the deployment's logs: {tmp_path}" in text, text
