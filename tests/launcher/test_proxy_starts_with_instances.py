"""The proxy's start overlaps the instances' model loads instead of following them."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.process import ChildProcess
from pdlaunch.launcher.readiness import ReadyWait


def test_the_proxy_is_running_while_the_instances_are_awaited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where every instance is this node's, the proxy is started with them: its ~3 s of imports on a loaded 2-core
    host were on the critical path of every `pdlaunch serve` (and of every end-to-end test's start)."""
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "model": {"path": "tiny"}, "log_dir": str(tmp_path / "logs"), "proxy": {"port": 0},
        "instances": [{"role": "prefill"}, {"role": "decode"}]})
    waits: list[tuple[list[str], bool]] = []

    def first_wait(self: Deployment, children: list[ChildProcess], wait: ReadyWait) -> bool:
        waits.append(([child.name for child in children], self.proxy is not None and self.proxy.poll() is None))
        return False  # stop there: as a user's Ctrl-C during the start

    monkeypatch.setattr(Deployment, "_wait_ready", first_wait)
    with Deployment(cfg, Console(quiet=True)) as deployment:
        assert deployment.start() is False
    assert waits == [(["prefill-0", "decode-0"], True)]
