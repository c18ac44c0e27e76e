"""`pdlaunch bench compare` checks the config of every deployment it builds (before the first starts, again to
start each, for the advisor's batch limit), mostly with the same warnings: each is said once for the whole
comparison. A --config file's settings that compare replaces in every deployment (the proxy port, the log
directory, the instances) are said once as such, not as serve's flags (`--port`) with the port of each deployment."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pdlaunch.bench import compare, compare_layout
from pdlaunch.bench.compare_config import CompareConfig
from pdlaunch.bench.compare_layout import Layout
from pdlaunch.bench.matmul_ceiling import MatmulCeiling, Yardstick
from pdlaunch.bench.rate_sweep import DeploymentRun
from tests.bench.test_compare_cli import _measured_run


def test_each_warning_is_said_once_for_the_whole_comparison(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def fake_run(cfg: CompareConfig, layout: Layout, kind: str, console: Any,
                 yardstick: Yardstick | None, **_: object) -> DeploymentRun:
        compare_layout.deployment_config(cfg, layout, kind)  # as run_deployment does, to start it
        ran.append(kind)
        return _measured_run(kind, layout)

    measured = MatmulCeiling(device="cpu (1 threads)", dtype="float32", n=1024, ms=40.0, tflops=0.054)
    monkeypatch.setattr(compare_layout, "measure_in_child", lambda *_: measured)
    monkeypatch.setattr(compare, "run_deployment", fake_run)
    monkeypatch.setenv("PDLAUNCH_ARRIVAL_WINDOW", "OFF")  # a warning about the environment, the same for each
    base = tmp_path / "base.yaml"
    base.write_text("proxy:\n  port: 8123\nlog_dir: mylogs\ninstances: [{role: prefill}, {role: decode}]\n")
    cfg = CompareConfig(model="tiny", rates=[2.0], out=tmp_path / "out", device="cpu", prefill=1, decode=2,
                        input_len=1024, config=base)
    caplog.set_level(logging.WARNING)
    compare.run_compare(cfg, Console(quiet=True))
    assert ran == ["colocated", "pd", "advised"]  # every call that checks a deployment's config was made
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warning: ")]
    assert [line for line, count in Counter(said).items() if count > 1] == [], said
    assert not [line for line in said if line.startswith("warning: --port")], said
    for key, shown in (("proxy.port", "8123"), ("log_dir", "'mylogs'"), ("instances", "[{'role': 'prefill'}")):
        assert [line for line in said if line.startswith(f"warning: {key} (in --config): compare starts each "
                                                         "deployment with ")
                and f"so {shown}" in line], said
    assert len([line for line in said if line.startswith("warning: PDLAUNCH_ARRIVAL_WINDOW: 'OFF'")]) == 1, said


def test_a_file_without_those_settings_is_no_warning(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("proxy:\n  workers: 1\n")
    cfg = CompareConfig(model="tiny", rates=[2.0], out=tmp_path / "out", config=base)
    assert compare_layout.own_setting_warnings(cfg) == []
    assert compare_layout.own_setting_warnings(CompareConfig(model="tiny", rates=[2.0], out=tmp_path)) == []
