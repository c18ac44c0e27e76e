"""`pdlaunch serve` says when the file system of its log directory fills up while it serves (and when it has room
again): the instances serve on, but their logs lose every line that does not fit, a crash's traceback too."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.supervisor import Supervisor
from tests.serving.test_fault_tolerance_supervisor import FakeDeployment

MIB = 1024 * 1024


@pytest.fixture()
def watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Supervisor, Console, dict[str, int]]]:
    disk = {"free": 10_000 * MIB}
    real = shutil.disk_usage

    def disk_usage(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total - disk["free"], disk["free"])

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    cfg = DeploymentConfig.model_validate({"device": "cpu", "proxy": {"port": 0}})
    deployment = FakeDeployment(cfg, tmp_path)
    console = Console(record=True, width=400, file=open("/dev/null", "w"))  # noqa: SIM115  # closed with the console
    deployment.console = console
    supervisor = Supervisor(deployment, console)
    supervisor._answers = lambda child: True  # type: ignore[method-assign]  # noqa: SLF001
    yield supervisor, console, disk
    supervisor.__exit__()
    console.file.close()


def test_a_log_directory_that_fills_up_is_said_once_and_its_room_again(watched: Any, tmp_path: Path) -> None:
    supervisor, console, disk = watched
    supervisor.tick(now=100.0)
    assert "log directory" not in console.export_text(clear=False)
    disk["free"] = 0
    supervisor.tick(now=101.0)
    supervisor.tick(now=111.0)
    supervisor.tick(now=121.0)
    text = console.export_text(clear=True)
    assert text.count(f"[pdlaunch] the log directory {tmp_path} is full: the instances' and the proxy's logs lose "
                      "every line that does not fit") == 1, text
    assert "free space on its file system, or run the next deployment with --log-dir on a larger one" in text
    disk["free"] = 100 * MIB  # above the warning, below room again: nothing said
    supervisor.tick(now=131.0)
    assert "log directory" not in console.export_text(clear=True)
    disk["free"] = 5000 * MIB
    supervisor.tick(now=141.0)
    assert f"[pdlaunch] the log directory {tmp_path} has room again (5000 MiB free)" in console.export_text(clear=True)
    disk["free"] = 3 * MIB
    supervisor.tick(now=151.0)
    assert f"the log directory {tmp_path} has only 3.0 MiB free:" in console.export_text(clear=True)
