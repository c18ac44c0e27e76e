"""Supervisor.tick on a deployment whose children are fakes and whose clock the test sets: what is
restarted when, with which engine_id, what the status rows say, and when serve gives up."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.status import StatusRow
from pdlaunch.launcher.supervisor import SupervisionFailed, Supervisor
from tests.helpers.fake_child import FakeChild


class FakeDeployment(Deployment):
    """The real plan and rows; children are FakeChild and restarts only record what they would start."""

    def __init__(self, cfg: DeploymentConfig, tmp: Path) -> None:
        super().__init__(cfg, Console(quiet=True), log_dir=tmp)
        self.instances = [FakeChild(p.spec.name, tmp / f"{p.spec.name}.log") for p in self.plan.instances]  # type: ignore[misc]
        self.proxy = FakeChild("proxy", tmp / "proxy.log")  # type: ignore[assignment]
        self.rows = {p.spec.name: StatusRow(p.spec.name, p.spec.role, "cpu", p.url, "ready")
                     for p in self.plan.instances} | {"proxy": StatusRow("proxy", "proxy", "-", "", "ready")}
        self.restarted: list[tuple[str, int, str]] = []

    def restart_child(self, child, restart: int, why: str) -> str:  # type: ignore[no-untyped-def]
        child.code, child.pid = None, child.pid + 1
        engine_id = "" if child is self.proxy else f"planned-{child.name}-r{restart}"
        self.restarted.append((child.name, restart, engine_id))
        return engine_id

    def refresh_blocks(self, name: str, timeout: float = 1.0) -> None:
        pass


@contextmanager
def supervised_pd(tmp_path: Path, restart: bool) -> Iterator[tuple[FakeDeployment, Supervisor, Console]]:
    """A fake 1P1D deployment (the decode's `restart` as given) under a Supervisor whose console records what it
    says (`console.export_text()`); the supervisor is closed on exit."""
    cfg = DeploymentConfig.model_validate({"device": "cpu", "proxy": {"port": 0},
                                           "instances": [{"role": "prefill"}, {"role": "decode", "restart": restart}]})
    deployment = FakeDeployment(cfg, tmp_path)
    with open(os.devnull, "w") as devnull:
        console = Console(record=True, width=1000, file=devnull)
        supervisor = Supervisor(deployment, console)
        try:
            yield deployment, supervisor, console
        finally:
            supervisor.__exit__()


@pytest.fixture()
def make(tmp_path: Path) -> Iterator[object]:
    made: list[Supervisor] = []

    def build(**data: object) -> tuple[FakeDeployment, Supervisor]:
        cfg = DeploymentConfig.model_validate({"device": "cpu", "proxy": {"port": 0}, **data})
        deployment = FakeDeployment(cfg, tmp_path)
        supervisor = Supervisor(deployment, deployment.console)
        made.append(supervisor)
        return deployment, supervisor

    yield build
    for supervisor in made:
        supervisor.__exit__()


def _answering(supervisor: Supervisor, names: set[str]) -> None:
    supervisor._answers = lambda child: child.name in names  # type: ignore[method-assign]  # noqa: SLF001


def test_a_killed_decode_is_restarted_after_the_backoff_with_a_new_engine_id(make) -> None:  # type: ignore[no-untyped-def]
    deployment, supervisor = make(instances=[{"role": "prefill"}, {"role": "decode", "count": 2}],
                                  supervision={"restart_backoff_seconds": 2})
    _answering(supervisor, set())
    decode = deployment.instances[1]
    decode.code = -9
    supervisor.tick(now=100.0)
    assert deployment.rows["decode-0"].state == "restarting (1)" and deployment.restarted == []
    # its group (TP workers it left, which hold GPU memory) is killed when the death is seen, not after the backoff
    assert decode.signals == [signal.SIGKILL]
    supervisor.tick(now=101.9)
    assert deployment.restarted == []
    supervisor.tick(now=102.0)
    assert deployment.restarted == [("decode-0", 1, "planned-decode-0-r1")]
    supervisor.tick(now=103.0)
    assert deployment.rows["decode-0"].state == "restarting (1)"  # not answering /health yet
    _answering(supervisor, {"decode-0"})
    supervisor.tick(now=104.0)
    assert deployment.rows["decode-0"].state == "ready" and supervisor.records[1][1].live


def test_the_proxy_is_restarted_unless_its_restart_is_off(make) -> None:  # type: ignore[no-untyped-def]
    deployment, supervisor = make(supervision={"restart_backoff_seconds": 1})
    deployment.proxy.code = -9
    supervisor.tick(now=0.0)
    supervisor.tick(now=1.0)
    assert deployment.restarted == [("proxy", 1, "")]

    deployment, supervisor = make(proxy={"port": 0, "restart": False})
    deployment.proxy.code = 1
    with pytest.raises(SupervisionFailed) as err:
        supervisor.tick(now=0.0)
    assert "proxy exited with code 1, and restarts are off for it (proxy.restart: false)" in err.value.message
    assert str(deployment.proxy.log_path) in err.value.message and deployment.rows["proxy"].state == "failed"


def test_a_role_down_past_the_grace_stops_serve_naming_its_instances(make) -> None:  # type: ignore[no-untyped-def]
    deployment, supervisor = make(supervision={"restart_backoff_seconds": 1, "role_down_grace_seconds": 10,
                                               "max_restarts": 100})
    _answering(supervisor, set())
    prefill = deployment.instances[0]
    prefill.code = -9
    supervisor.tick(now=0.0)
    supervisor.tick(now=1.0)  # restart 1 starts, never answers
    supervisor.tick(now=10.0)
    with pytest.raises(SupervisionFailed) as err:
        supervisor.tick(now=10.5)
    message = err.value.message
    assert message.startswith("no live prefill instance for 10s (supervision.role_down_grace_seconds: 10)")
    assert "prefill-0 restarting (1) (it was killed by signal 9 (SIGKILL); log " in message
    assert str(prefill.log_path) in message


def test_a_role_down_past_the_grace_names_the_first_cause_of_the_outage(make) -> None:  # type: ignore[no-untyped-def]
    """The restarts die for their own reason (here: their port is taken, code 3); the message still names what
    took the instance down first, then how its last restart ended."""
    deployment, supervisor = make(supervision={"restart_backoff_seconds": 1, "role_down_grace_seconds": 10,
                                               "max_restarts": 100})
    _answering(supervisor, set())
    prefill = deployment.instances[0]
    prefill.code = -9
    supervisor.tick(now=0.0)
    supervisor.tick(now=1.0)  # restart 1
    prefill.code = 3  # dies before it was ready
    supervisor.tick(now=2.0)
    supervisor.tick(now=4.0)  # restart 2, never answers
    with pytest.raises(SupervisionFailed) as err:
        supervisor.tick(now=10.5)
    assert ("prefill-0 restarting (2) (it was killed by signal 9 (SIGKILL); its last restart exited with code 3; "
            "log " in err.value.message)


def test_max_restarts_failures_in_a_row_stop_serve(make) -> None:  # type: ignore[no-untyped-def]
    deployment, supervisor = make(supervision={"restart_backoff_seconds": 1, "max_restarts": 2,
                                               "role_down_grace_seconds": 1000})
    _answering(supervisor, set())
    decode = deployment.instances[1]
    decode.code = -9
    supervisor.tick(now=0.0)
    supervisor.tick(now=1.0)  # restart 1
    decode.code = -11  # dies before it was ready: 1 failure, next wait 2 s
    supervisor.tick(now=2.0)
    supervisor.tick(now=3.9)
    assert [r[1] for r in deployment.restarted] == [1]
    supervisor.tick(now=4.0)  # restart 2
    decode.code = -11
    with pytest.raises(SupervisionFailed) as err:
        supervisor.tick(now=5.0)
    assert ("decode-0 was killed by signal 11 (SIGSEGV) before it was ready again: 2 restart(s) in a row failed"
            in err.value.message)
    assert "the outage began when it was killed by signal 9" in err.value.message


def test_a_restart_stuck_starting_is_killed_after_the_ready_timeout(make, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("pdlaunch.launcher.supervisor.READY_TIMEOUT_S", 50.0)
    deployment, supervisor = make(supervision={"restart_backoff_seconds": 1, "role_down_grace_seconds": 1000})
    _answering(supervisor, set())
    decode = deployment.instances[1]
    decode.code = -9
    supervisor.tick(now=0.0)
    assert decode.signals == [9]  # the dead one's group
    supervisor.tick(now=1.0)
    supervisor.tick(now=50.0)
    assert decode.signals == [9]
    supervisor.tick(now=51.5)
    assert decode.signals == [9, 9]  # the stuck restart
    supervisor.tick(now=52.0)
    assert decode.signals == [9, 9]  # once, not every tick
