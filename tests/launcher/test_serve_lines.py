"""`pdlaunch serve`'s own lines stay whole without a TTY (nohup, systemd, a pipe): rich wrapped them at 80 columns,
and the drain line of a SIGTERM read `... then stopping; Ctrl-C` on one log line and `again to stop at once` on the
next."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher import serve


class StartedDeployment:
    """A deployment that started at once and stops with nothing left running."""

    def __init__(self, cfg: DeploymentConfig, console: Any) -> None:
        self.cfg, self.log_dir, self.left_running = cfg, Path(cfg.log_dir), list[str]()
        self.proxy_url = "http://127.0.0.1:1"
        self.drain_timeout_s = cfg.supervision.drain_timeout_seconds

    def start(self, should_stop: Any) -> bool:
        return True

    def stop(self, drain: bool = True, hurry: Any = None) -> None:
        """Nothing to stop."""


class SigtermOnFirstTick:
    """The supervisor: its first tick is the operator's SIGTERM."""

    def __init__(self, deployment: StartedDeployment, console: Any) -> None:
        self.sent = False

    def __enter__(self) -> SigtermOnFirstTick:
        return self

    def __exit__(self, *exc: object) -> None:
        """Nothing to end."""

    def tick(self) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_the_drain_line_is_one_line_without_a_tty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # rich's width without a TTY: 80 columns
    monkeypatch.setattr(serve, "Deployment", StartedDeployment)
    monkeypatch.setattr(serve, "Supervisor", SigtermOnFirstTick)
    cfg = DeploymentConfig.model_validate({"device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
                                           "model": {"path": "tiny"}, "log_dir": str(tmp_path / "logs")})
    assert serve.run_serve(cfg) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ("SIGTERM received: draining in-flight requests (up to 5s), then stopping; Ctrl-C again to stop at once"
            in lines), lines
    assert lines[-1] == "stopped: all processes reaped"
