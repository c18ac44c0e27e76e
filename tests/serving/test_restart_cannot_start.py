"""A restart that cannot start its process (the log file cannot be opened: a full or read-only disk, a directory in
the way) is a failed restart, retried after the backoff, while the other instances serve on: it ended the whole
deployment at once, cutting every open request, with the startup hint `pass --log-dir DIR`."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.supervisor import SupervisionFailed, Supervisor
from tests.serving.test_fault_tolerance_supervisor import FakeDeployment

LOG_ERROR = "cannot write decode-0's log '/logs/decode-0.log': Is a directory"


class UnwritableLogDeployment(FakeDeployment):
    """Restarts fail as ChildProcess.start does when the log cannot be opened, until `writable`."""

    writable = False

    def restart_child(self, child, restart: int, why: str) -> str:  # type: ignore[no-untyped-def]
        if not self.writable:
            raise PdlaunchError(LOG_ERROR, field="log_dir", hint="pass --log-dir DIR")
        return super().restart_child(child, restart, why)


def _supervised(tmp_path: Path, max_restarts: int) -> tuple[UnwritableLogDeployment, Supervisor]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "proxy": {"port": 0}, "instances": [{"role": "prefill"}, {"role": "decode"}],
        "supervision": {"restart_backoff_seconds": 1, "max_restarts": max_restarts}})
    deployment = UnwritableLogDeployment(cfg, tmp_path)
    supervisor = Supervisor(deployment, deployment.console)
    supervisor._answers = lambda child: True  # type: ignore[method-assign]  # noqa: SLF001
    return deployment, supervisor


def test_a_restart_whose_log_cannot_be_opened_is_retried(tmp_path: Path) -> None:
    deployment, supervisor = _supervised(tmp_path, max_restarts=5)
    try:
        deployment.instances[1].code = -9  # type: ignore[attr-defined]
        supervisor.tick(now=100.0)
        supervisor.tick(now=101.0)  # restart 1: its log cannot be opened
        record = supervisor.records[1][1]
        assert deployment.rows["decode-0"].state == "restarting (2)"
        assert record.last_exit == f"could not be restarted ({LOG_ERROR})"
        assert record.due == 103.0  # the backoff doubled, as for a restart that died before it was ready
        deployment.writable = True
        supervisor.tick(now=103.0)
        assert deployment.restarted == [("decode-0", 2, "planned-decode-0-r2")]
        supervisor.tick(now=104.0)
        assert deployment.rows["decode-0"].state == "ready"
    finally:
        supervisor.__exit__()


def test_restarts_that_keep_failing_to_start_stop_serve_naming_why(tmp_path: Path) -> None:
    deployment, supervisor = _supervised(tmp_path, max_restarts=2)
    try:
        deployment.instances[1].code = -9  # type: ignore[attr-defined]
        supervisor.tick(now=100.0)
        supervisor.tick(now=101.0)
        with pytest.raises(SupervisionFailed) as failed:
            supervisor.tick(now=103.0)
        assert (f"decode-0 could not be restarted ({LOG_ERROR}) before it was ready again: 2 restart(s) in a row "
                "failed (supervision.max_restarts: 2); the outage began when it ") in failed.value.message
        assert "--log-dir" not in failed.value.message
    finally:
        supervisor.__exit__()
