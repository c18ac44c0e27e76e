"""`pdlaunch serve` says when the file system of its log directory fills up while it serves (and when it has room
again): the instances serve on, but their logs lose every line that does not fit, a crash's traceback too."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.supervisor import Supervisor
from tests.serving.helpers import wait_for
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


def test_a_log_directory_that_does_not_answer_does_not_hold_the_tick(
        watched: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """shutil.disk_usage ran on the supervisor's tick with no timeout: a hung network mount under the log directory
    held supervision (restarts, stall kills, status rows) for as long as it hung. The tick returns; the directory
    that does not answer is said once, and again when it answers."""
    supervisor, console, disk = watched
    answer = threading.Event()
    asked: list[Any] = []
    real = shutil.disk_usage

    def hung_disk_usage(path: Any) -> Any:
        asked.append(path)
        answer.wait()  # a hung NFS server: the call returns once it answers again
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", hung_disk_usage)
    try:
        for now in (100.0, 101.0, 103.0, 111.0, 121.0):
            ticking = threading.Thread(target=supervisor.tick, kwargs={"now": now}, daemon=True)
            ticking.start()
            ticking.join(timeout=30)
            assert not ticking.is_alive(), f"the tick at {now} waited on the log directory's file system"
        assert len(asked) == 1  # one question at a time: no thread more at each check while it hangs
        text = console.export_text(clear=True)
        assert text.count(f"[pdlaunch] the log directory {tmp_path} does not answer: asking its file system for "
                          "free space has not returned within 2s") == 1, text
    finally:
        answer.set()
    now = 130.0

    def answered() -> bool:
        nonlocal now
        now += 1.0
        supervisor.tick(now=now)
        return f"[pdlaunch] the log directory {tmp_path} answers again" in console.export_text(clear=False)

    wait_for(answered, "the log directory's answer to be said", 30)
