"""`--backend ray` honours supervision.stall_restart_seconds as the local supervisor does (launcher/supervisor.py):
a ready instance whose rank-0 actor is alive but whose /health stops answering (a hung engine, a stopped or
swapping process) is said to be stalled, and once stalled that long it is ended like a dead one (its actors
killed, its placement group removed) and restarted after the backoff. Before, the Ray launcher never probed a
ready instance: its `serve` call kept running, and the instance stayed "ready", serving nothing, for good.
Stand-ins for the ray module; the stalled instance is a socket that accepts connections and never answers."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.config.deployment_config import DeploymentConfig  # noqa: E402 (after the importorskip)
from pdlaunch.launcher.backends import ray_deployment  # noqa: E402
from pdlaunch.launcher.backends.ray_deployment import RayDeployment  # noqa: E402
from tests.cluster.test_backend_failures_ray import NODES, FakeRay  # noqa: E402

WAIT_S = 60.0  # for the stall to be seen, on a loaded machine (it takes 2-3 s)


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A port whose server accepts connections (the kernel's backlog) and never answers: a stalled instance."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        yield hung.getsockname()[1]


def _deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, supervision: dict[str, float],
                hung_port: int) -> tuple[RayDeployment, list[str]]:
    """prefill-0 ready at the hung port; decode-0 ready where nothing listens (refused: not a stall)."""
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "launcher": {"backend": "ray"}, "log_dir": str(tmp_path / "logs"),
        "proxy": {"port": 0, "health_timeout_seconds": 0.5}, "supervision": supervision,
        "instances": [{"role": "prefill", "tp": 1}, {"role": "decode", "tp": 1}]})
    monkeypatch.setattr(ray_deployment, "connect", lambda cfg: FakeRay())
    monkeypatch.setattr(ray_deployment, "live_nodes", lambda ray_module: NODES)
    deployment = RayDeployment(cfg, Console(file=io.StringIO()))
    said: list[str] = []
    monkeypatch.setattr(deployment, "say", said.append)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused_port = closed.getsockname()[1]
    for run, port in zip(deployment.runs, (hung_port, refused_port)):
        run.spec = run.plan.spec.model_copy(update={"host": "127.0.0.1", "port": port})
        run.state = "ready"
    return deployment, said


def _tick_until(deployment: RayDeployment, done: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} within {WAIT_S:.0f}s"
        deployment.tick()
        time.sleep(0.05)


def test_a_stalled_instance_is_restarted_after_stall_restart_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     hung_port: int) -> None:
    deployment, said = _deployment(tmp_path, monkeypatch, {"stall_restart_seconds": 1.0}, hung_port)
    prefill, decode = deployment.runs
    try:
        _tick_until(deployment, lambda: prefill.state == "down", "the stalled prefill-0 was not ended")
    finally:
        deployment.stop(drain=False)
    assert prefill.record.last_exit.startswith("was stalled for "), prefill.record.last_exit
    assert prefill.record.last_exit.endswith("(no /health answer; supervision.stall_restart_seconds: 1)")
    assert prefill.record.due is not None and prefill.actors == [] and prefill.pg is None
    assert decode.state == "ready", "an instance that refuses connections is not stalled"
    assert any(line.startswith("prefill-0 is stalled: its Ray actor is alive, but /health at http://127.0.0.1:"
                               f"{hung_port} has not answered within 0.5s") and "restarted after supervision."
               "stall_restart_seconds: 1s" in line for line in said), said
    assert any(line.startswith("prefill-0 was stalled for ") and "restart 1 in 1.0s" in line for line in said), said


def test_a_stalled_instance_is_left_running_when_stall_restart_seconds_is_unset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hung_port: int) -> None:
    deployment, said = _deployment(tmp_path, monkeypatch, {}, hung_port)
    prefill = deployment.runs[0]
    try:
        _tick_until(deployment, lambda: any("is stalled" in line for line in said), "prefill-0's stall was not said")
        for _ in range(20):
            deployment.tick()
    finally:
        deployment.stop(drain=False)
    assert prefill.state == "ready" and prefill.record.due is None
    assert any("it is left running (supervision.stall_restart_seconds is unset)" in line for line in said), said
