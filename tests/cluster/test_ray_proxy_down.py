"""`--backend ray`: a proxy restart that never answers is supervised as the local supervisor supervises it
(launcher/supervisor.py): the proxy counts as down once it is not live for supervision.role_down_grace_seconds
(exit 1, naming the grace and the proxy's log), and a restart not ready within READY_TIMEOUT_S is killed, its exit
a failed restart toward supervision.max_restarts. Before, the Ray launcher watched the instances' roles only and
gave a restarted proxy no deadline: one alive but never answering left the deployment without a proxy, for good,
without a word. Stand-ins for the ray module and the proxy's process."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.launcher.backends import ray_proxy  # noqa: E402 (after the importorskip)
from pdlaunch.launcher.backends.ray_deployment import RayDeployment  # noqa: E402
from pdlaunch.launcher.backends.ray_run import RayDeploymentFailed  # noqa: E402
from pdlaunch.launcher.readiness import READY_TIMEOUT_S  # noqa: E402
from tests.cluster.test_backend_failures_ray import FakeRay, deployment_on  # noqa: E402
from tests.cluster.test_ray_proxy_restart import _Proxy  # noqa: E402


class _HungProxy(_Proxy):
    """The proxy's process: `signals` what the launcher sent its group; SIGKILL ends it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.signals: list[int] = []

    def signal_group(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL and self.exited is None:  # a reaped leader's exit stays what it was
            self.exited = -9


def _restarted_and_hung(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[RayDeployment, float]:
    """Every instance ready; the proxy exited at t=100 and was restarted after the backoff, and its restart never
    answers. Returns the deployment and when the restart began."""
    deployment = deployment_on(FakeRay(), tmp_path, monkeypatch)
    monkeypatch.setattr(ray_proxy, "ChildProcess", _HungProxy)
    monkeypatch.setattr(deployment, "say", lambda text: None)
    for port, run in enumerate(deployment.runs, start=9000):
        run.spec = run.plan.spec.model_copy(update={"host": "10.0.0.2", "port": port})
        run.state = "ready"
    proxy = deployment.proxy
    proxy.start(deployment.runs, note=None)
    assert isinstance(proxy.process, _HungProxy)
    proxy.process.exited = 1
    deployment._check_roles(100.0)
    proxy.check(deployment.runs, now=100.0, policy=deployment.policy)
    due = proxy.record.due
    assert due is not None
    proxy.check(deployment.runs, now=due, policy=deployment.policy)
    assert proxy.process.exited is None and not proxy.record.ready
    assert proxy.process.signals == [signal.SIGKILL]  # its first run's group, killed when its exit was seen
    proxy.process.signals.clear()
    monkeypatch.setattr(proxy, "answers", lambda: False)
    return deployment, due


def test_a_proxy_not_live_for_the_grace_stops_the_deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deployment, restarted = _restarted_and_hung(tmp_path, monkeypatch)
    grace = deployment.policy.grace_s
    deployment.proxy.check(deployment.runs, now=restarted + grace, policy=deployment.policy)
    with pytest.raises(RayDeploymentFailed) as failed:
        deployment._check_roles(restarted + grace)
    assert failed.value.message.startswith(f"the proxy has not been live for {grace + restarted - 100.0:.0f}s "
                                           f"(supervision.role_down_grace_seconds: {grace:g})"), failed.value.message
    assert "it exited with code 1 (log " in failed.value.message, failed.value.message
    assert failed.value.log_path == deployment.log_dir / "proxy.log"


def test_a_proxy_restart_not_ready_in_time_is_killed_and_counted(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    deployment, restarted = _restarted_and_hung(tmp_path, monkeypatch)
    proxy = deployment.proxy
    assert isinstance(proxy.process, _HungProxy)
    proxy.check(deployment.runs, now=restarted + READY_TIMEOUT_S - 1.0, policy=deployment.policy)
    assert proxy.process.signals == []
    proxy.check(deployment.runs, now=restarted + READY_TIMEOUT_S + 1.0, policy=deployment.policy)
    assert proxy.process.signals == [signal.SIGKILL]
    proxy.check(deployment.runs, now=restarted + READY_TIMEOUT_S + 2.0, policy=deployment.policy)
    assert proxy.record.failures == 1 and proxy.record.due is not None, proxy.record
