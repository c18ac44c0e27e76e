"""supervision.role_down_grace_seconds on a deployment over several nodes (`pdlaunch serve --node-rank K`, and each
node's launcher under `--backend slurm`, which is the same): node 0 holds every role to the grace, one with instances
on several nodes and one only other nodes run, counting another node's instance live while its /health says ready.
Before, a role with any instance on another node was left out on every node: with all its instances down, the
deployment served 503s for good without a word. Supervisor.tick on fake children with a clock the test sets; the
other nodes' instances are what node 0's health probes last said of them."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.process import ChildProcess
from pdlaunch.launcher.status import StatusRow
from pdlaunch.launcher.supervisor import SupervisionFailed, Supervisor
from tests.helpers.fake_child import FakeChild

NODE1_PORT = 18100  # the fixed port of the group node 1 runs (node 0 must know it)
GRACE = {"restart_backoff_seconds": 1, "role_down_grace_seconds": 10, "max_restarts": 100}


class NodeDeployment(Deployment):
    """One node's deployment as its launcher supervises it: the real plan; its children fakes, every row ready."""

    def __init__(self, cfg: DeploymentConfig, tmp: Path) -> None:
        super().__init__(cfg, Console(quiet=True), log_dir=tmp)
        self.instances = [FakeChild(p.spec.name, tmp / f"{p.spec.name}.log")  # type: ignore[misc]
                          for p in self.plan.local]
        self.rows = {p.spec.name: StatusRow(p.spec.name, p.spec.role, "cpu", p.url, "ready")
                     for p in self.plan.instances}
        if self.plan.proxy_url is not None:
            self.proxy = FakeChild("proxy", tmp / "proxy.log")  # type: ignore[assignment]
            self.rows["proxy"] = StatusRow("proxy", "proxy", "-", self.plan.proxy_url, "ready")

    def restart_child(self, child: ChildProcess, restart: int, why: str) -> str:
        child.code = None  # type: ignore[attr-defined]  # a FakeChild: started again, never answers
        return f"planned-{child.name}-r{restart}"

    def refresh_blocks(self, name: str, timeout: float = 1.0) -> None:
        pass


def _config(node_rank: int, groups: list[dict[str, Any]]) -> DeploymentConfig:
    return DeploymentConfig.model_validate({
        "device": "cpu", "proxy": {"port": 0}, "supervision": GRACE,
        "security": {"deployment_secret": "role-grace-nodes-test-0123456789"},
        "parallel": {"node_rank": node_rank, "nodes": [{"address": "127.0.0.1"}, {"address": "127.0.0.2"}]},
        "instances": groups})


@pytest.fixture()
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[NodeDeployment, Supervisor,
                                                                                      dict[str, str]]]]:
    """`node(rank, groups)`: that node's deployment, its supervisor (nothing answers its own children's /health),
    and the health its probes last read of each other node's instance (a dict the test sets)."""
    made: list[Supervisor] = []

    def build(node_rank: int, groups: list[dict[str, Any]]) -> tuple[NodeDeployment, Supervisor, dict[str, str]]:
        deployment = NodeDeployment(_config(node_rank, groups), tmp_path / f"node{node_rank}")
        supervisor = Supervisor(deployment, deployment.console)
        made.append(supervisor)
        health: dict[str, str] = {}
        monkeypatch.setattr(supervisor.stall_watch, "health", health.get)
        monkeypatch.setattr(supervisor, "_answers", lambda child: False)
        monkeypatch.setattr(supervisor, "_say", lambda text: None)
        return deployment, supervisor, health

    yield build
    for supervisor in made:
        supervisor.__exit__()


def _kill(deployment: NodeDeployment, supervisor: Supervisor, name: str) -> None:
    """`name` dies at t=0; its restart (t=1) never answers."""
    child = next(c for c in deployment.instances if c.name == name)
    child.code = -signal.SIGKILL  # type: ignore[attr-defined]
    supervisor.tick(now=0.0)
    supervisor.tick(now=1.0)
    assert deployment.rows[name].state == "restarting (1)"


SPANNING = [{"role": "colocated", "node": 0}, {"role": "colocated", "node": 1, "base_port": NODE1_PORT}]


def test_node0_stops_when_a_role_spanning_nodes_has_no_live_instance_past_the_grace(node) -> None:  # type: ignore[no-untyped-def]
    deployment, supervisor, health = node(0, SPANNING)
    _kill(deployment, supervisor, "colocated-0")
    supervisor.tick(now=5.0)  # node 1's instance still answers: the role is live
    health["colocated-1"] = "down"  # then node 1's instance goes too
    supervisor.tick(now=6.0)
    supervisor.tick(now=16.0)
    with pytest.raises(SupervisionFailed) as err:
        supervisor.tick(now=16.5)
    message = err.value.message
    assert message.startswith("no live colocated instance for 10s (supervision.role_down_grace_seconds: 10): "
                              "colocated-0 restarting (1) (it was killed by signal 9 (SIGKILL); log "), message
    assert message.endswith(f"; colocated-1 down (on node 1 at http://127.0.0.2:{NODE1_PORT}; node 1's launcher "
                            "restarts it, and its log is there)"), message
    assert err.value.child is deployment.instances[0]


def test_another_nodes_ready_instance_keeps_a_spanning_role_live(node) -> None:  # type: ignore[no-untyped-def]
    deployment, supervisor, health = node(0, SPANNING)
    _kill(deployment, supervisor, "colocated-0")
    health["colocated-1"] = "ready"
    for now in (20.0, 40.0, 60.0):
        supervisor.tick(now=now)
    health["colocated-1"] = "stalled"  # no answer in time: node 0 cannot tell it from a node that is gone
    supervisor.tick(now=61.0)
    with pytest.raises(SupervisionFailed, match=r"^no live colocated instance for 10s"):
        supervisor.tick(now=71.5)


def test_node0_stops_when_a_role_only_another_node_runs_is_down_past_the_grace(node) -> None:  # type: ignore[no-untyped-def]
    deployment, supervisor, health = node(0, [{"role": "colocated", "node": 1, "base_port": NODE1_PORT}])
    assert deployment.instances == []  # node 0 runs only the proxy
    health["colocated-0"] = "loading"  # node 1's launcher restarted it, and it never comes back
    supervisor.tick(now=0.0)
    supervisor.tick(now=10.0)
    with pytest.raises(SupervisionFailed) as err:
        supervisor.tick(now=10.5)
    assert err.value.message == (
        "no live colocated instance for 10s (supervision.role_down_grace_seconds: 10): colocated-0 loading (on node 1 "
        f"at http://127.0.0.2:{NODE1_PORT}; node 1's launcher restarts it, and its log is there)")
    assert err.value.child is deployment.proxy  # its log says how the proxy saw the instance go


def test_another_node_judges_only_the_roles_wholly_its_own(node) -> None:  # type: ignore[no-untyped-def]
    """Node 1 does not see node 0's instances: a spanning role is node 0's to judge, a role only node 1 runs its own."""
    groups = [{"role": "colocated", "node": 0, "base_port": 18200}, {"role": "colocated", "node": 1},
              {"role": "prefill", "node": 1}, {"role": "decode", "node": 1}]
    deployment, supervisor, _ = node(1, groups)
    assert supervisor.roles == ["decode", "prefill"]
    _kill(deployment, supervisor, "prefill-0")
    with pytest.raises(SupervisionFailed, match=r"^no live prefill instance for 10s .*: prefill-0 restarting \(1\)"):
        supervisor.tick(now=10.5)


def test_another_nodes_sleeping_instance_keeps_its_role_live(node) -> None:  # type: ignore[no-untyped-def]
    """A sleeping instance (POST /sleep: its /health says 503 "sleeping") is put to sleep on purpose and wakes on
    /wake_up: node 0 counts a local one live (it is ready, not dead), so another node's counts too. Before, node 0
    stopped a healthy deployment whose instances of a role on other nodes slept for longer than the grace."""
    deployment, supervisor, health = node(0, [{"role": "colocated", "node": 1, "base_port": NODE1_PORT}])
    health["colocated-0"] = "sleeping"
    for now in (0.0, 10.5, 60.0, 600.0):
        supervisor.tick(now=now)
    assert deployment.rows["colocated-0"].state == "sleeping"
    health["colocated-0"] = "down"  # then it goes: the grace runs from here
    supervisor.tick(now=601.0)
    with pytest.raises(SupervisionFailed, match=r"^no live colocated instance for 10s .*colocated-0 down"):
        supervisor.tick(now=611.5)
