"""`--backend ray`: an instance that lost a node of its placement group between its placement and the start of its
actors, while the deployment starts, is placed again after the backoff; once it answers it is live like any other.
Before, the start marked it ready without telling its restart record, which kept saying "not ready since the
restart": the role counted as down while it served (the deployment stopped after role_down_grace_seconds, exit 1),
and its next death counted as a failed restart. Stand-ins for the ray module and the actors; no cluster."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.launcher.backends import ray_deployment  # noqa: E402 (after the importorskip)
from pdlaunch.launcher.backends.ray_run import RayRun  # noqa: E402
from tests.cluster.test_backend_failures_ray import FakeRay, deployment_on  # noqa: E402


class Actors:
    """The instances' placement groups and actors: prefill-0's first group loses a node before its actors start."""

    def __init__(self) -> None:
        self.lost_once = False
        self.events: list[str] = []

    def place(self, run: RayRun) -> None:
        run.state = "placing"
        self.events.append(f"place {run.name}")

    def placed(self, run: RayRun) -> bool:
        return True

    def launch(self, run: RayRun, prefill_side_channels: str) -> bool:
        if run.name == "prefill-0" and not self.lost_once:
            self.lost_once = True
            return False
        run.spec = run.plan.spec.model_copy(update={"host": "10.0.0.2"})
        run.state = "starting"
        return True

    def exit_of(self, run: RayRun) -> str | None:
        return None

    def remove(self, run: RayRun) -> None:
        self.events.append(f"remove {run.name}")


def test_an_instance_placed_again_while_starting_is_live_once_ready(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    deployment = deployment_on(FakeRay(gcs_address="10.0.0.1:6379"), tmp_path, monkeypatch)
    said: list[str] = []
    monkeypatch.setattr(deployment, "say", said.append)
    deployment.policy = dataclasses.replace(deployment.policy, backoff_s=0.01)  # placed again at the next poll
    actors = Actors()
    deployment.actors = actors  # type: ignore[assignment]
    monkeypatch.setattr(ray_deployment, "POLL_S", 0.01)
    monkeypatch.setattr(deployment, "answers", lambda run: run.state == "starting")
    monkeypatch.setattr(deployment.proxy, "start", lambda runs, note: None)
    monkeypatch.setattr(deployment.proxy, "wait_ready", lambda deadline, should_stop: True)
    try:
        assert deployment.start(should_stop=lambda: False)
    finally:
        deployment._lock.release()
    prefill = deployment.runs[0]
    # launcher.ray_address auto, said as what it found (before: "asked of the cluster at auto")
    assert any(line.startswith("ray: 2 placement group(s) asked of the Ray cluster this machine is part of "
                               "(launcher.ray_address auto: RAY_ADDRESS is not set: the one a `ray start` on this "
                               "machine runs), at 10.0.0.1:6379 (timeout") for line in said), said
    assert actors.events.count("place prefill-0") == 2 and prefill.record.restarts == 1, actors.events
    assert prefill.state == "ready" and prefill.record.live, prefill.record
    grace = deployment.policy.grace_s
    deployment._check_roles(1000.0)
    deployment._check_roles(1000.0 + grace + 1.0)  # it serves: its role is not down
