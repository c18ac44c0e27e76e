"""`--backend ray`: a log directory whose file system fills up while serving is said once, and again when it has room
again, as the local supervisor says it (launcher/log_space.py). Before, the Ray launcher never looked: the instances'
logs (on log_dir's shared storage) lost their lines without a word. Stand-ins for the ray module."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.launcher import log_space  # noqa: E402 (after the importorskip)
from tests.cluster.test_backend_failures_ray import FakeRay, deployment_on  # noqa: E402

Usage = namedtuple("Usage", "total used free")
MIB = 1024 * 1024


def test_a_log_directory_filling_up_is_said_once_then_room_again(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = deployment_on(FakeRay(), tmp_path, monkeypatch)
    said: list[str] = []
    monkeypatch.setattr(deployment, "say", said.append)
    free = {"bytes": 3 * MIB}
    asked: list[Path] = []

    def disk_usage(path: Path) -> Usage:
        asked.append(Path(path))
        return Usage(1024 * MIB, 1024 * MIB - free["bytes"], free["bytes"])

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    clock = {"now": 1000.0}
    monkeypatch.setattr("pdlaunch.launcher.backends.ray_deployment.time.monotonic", lambda: clock["now"])
    deployment.tick()
    deployment.tick()  # within CHECK_EVERY_S: not asked again, not said again
    low = [line for line in said if line.startswith(f"the log directory {deployment.log_dir} has only 3.0 MiB free")]
    assert len(low) == 1 and asked == [deployment.log_dir], said

    free["bytes"] = 512 * MIB
    clock["now"] += log_space.CHECK_EVERY_S
    deployment.tick()
    assert said[-1].startswith(f"the log directory {deployment.log_dir} has room again (512 MiB free)"), said
