"""`--backend ray`: a dead prefill or decode is forgotten by its ready peers before it is placed again, as the local
supervisor does (launcher/forget_peers.py). Stand-ins for the ray module and the actors; no cluster."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.launcher.backends.ray_deployment import RayDeployment  # noqa: E402 (after the importorskip)
from tests.cluster.test_backend_failures_ray import FakeRay, deployment_on  # noqa: E402


def _serving(deployment: RayDeployment) -> None:
    """Every instance placed and ready at its node's address, with its engine_id."""
    for port, run in enumerate(deployment.runs, start=9000):
        run.spec = run.plan.spec.model_copy(update={"host": "10.0.0.2", "port": port})
        run.state = "ready"


def test_the_ready_peers_forget_the_dead_instance_before_it_is_placed_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = deployment_on(FakeRay(), tmp_path, monkeypatch)
    _serving(deployment)
    prefill, decode = deployment.runs
    events: list[str] = []
    lock = threading.Lock()

    def ask(url: str, engine_id: str, timeout: float) -> int:
        time.sleep(0.3)  # the answer takes a while: placing must wait for it
        with lock:
            events.append(f"forgot {engine_id} at {url}")
        return 1

    deployment.ask_forget = ask
    monkeypatch.setattr(deployment.actors, "remove", lambda run: None)
    monkeypatch.setattr(deployment.actors, "place", lambda run: events.append(f"placed {run.name}"))
    said: list[str] = []
    monkeypatch.setattr(deployment, "say", said.append)
    assert decode.spec is not None
    dead_engine = decode.spec.engine_id
    deployment._ended(decode, "lost its Ray actor (node died)", now=0.0)
    deployment._restart_when_due(decode, now=10.0)
    assert events == [f"forgot {dead_engine} at {prefill.url}", "placed decode-0"]
    assert "prefill-0 forgot decode-0's NIXL agent (1)" in said


def test_no_forget_for_a_storage_deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = deployment_on(FakeRay(), tmp_path, monkeypatch)
    deployment.cfg.kv_transfer.connector = "storage"
    _serving(deployment)
    asked: list[str] = []
    deployment.ask_forget = lambda url, engine_id, timeout: asked.append(url) or 0
    monkeypatch.setattr(deployment.actors, "remove", lambda run: None)
    monkeypatch.setattr(deployment.actors, "place", lambda run: None)
    deployment._ended(deployment.runs[0], "exited with code 1", now=0.0)
    deployment._restart_when_due(deployment.runs[0], now=10.0)
    assert asked == []
