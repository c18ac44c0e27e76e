"""`--backend ray`: a stop signal while the launcher fetches or converts its model (the first use of `demo`, a pip
download, or of a GGUF file: minutes for a large one) ends that work and the run, exit 0, with no placement group
asked of the cluster and log_dir let go, as `pdlaunch serve` does locally (tests/launcher/test_stop_while_preparing.py).
Before, the signal only set a flag that the start looked at once the model was ready. Stand-ins for the ray module;
no cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.launcher.backends import ray as backend  # noqa: E402 (after the importorskip)
from pdlaunch.launcher.backends.ray_run import RayRun  # noqa: E402
from pdlaunch.launcher.log_dir_lock import log_dir_holder  # noqa: E402
from tests.cluster.test_backend_failures_ray import FakeRay, deployment_on, ray_cfg  # noqa: E402
from tests.helpers.slow_fetch import slow_fetch_interrupted  # noqa: E402

FETCH_S = 20.0  # the stand-in fetch's length: far longer than the test takes when the signal ends it


def test_a_stop_signal_ends_the_model_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, term_guard: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    finished = slow_fetch_interrupted(monkeypatch, FETCH_S)
    fake = FakeRay()
    deployment = deployment_on(fake, tmp_path, monkeypatch)
    deployment.cfg.model.path = "tiny"
    placed: list[str] = []

    def place(run: RayRun) -> None:
        placed.append(run.name)
        run.state = "placing"

    monkeypatch.setattr(deployment.actors, "place", place)
    monkeypatch.setattr(deployment.actors, "placed", lambda run: False)
    monkeypatch.setattr(backend, "RayDeployment", lambda cfg, console: deployment)

    started = time.monotonic()
    assert backend.run_ray(ray_cfg(tmp_path)) == 0
    output = " ".join(capsys.readouterr().out.split())
    assert not finished, f"the fetch ran to its end ({time.monotonic() - started:.0f}s): {output}"
    assert "SIGTERM received while fetching or converting the model; stopping" in output, output
    assert placed == [], "a placement group was asked of the cluster after the stop signal"
    assert log_dir_holder(deployment.log_dir) is None and fake.calls[-1] == "shutdown", fake.calls
