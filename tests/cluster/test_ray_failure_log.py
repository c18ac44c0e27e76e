"""`--backend ray`: an instance that fails for good (while the deployment starts, or with its restarts off or spent)
stops the deployment with its error and the last lines of its log, as the local backend shows a failed child's
(launcher/serve.report_failure). Before, the error named only the log's path: an engine that failed under its
rank-0 actor ended as "prefill-0 exited with code 1 while starting", its reason left in a file on shared storage.
Stand-ins for the ray module and the actors; no cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.launcher.backends import ray as backend  # noqa: E402 (after the importorskip)
from pdlaunch.launcher.backends import ray_deployment  # noqa: E402
from pdlaunch.launcher.backends.ray_deployment import RayDeployment  # noqa: E402
from pdlaunch.launcher.backends.ray_run import RayRun  # noqa: E402
from tests.cluster.test_backend_failures_ray import FakeRay, deployment_on, ray_cfg  # noqa: E402

CAUSE = "ERROR prefill-0 pdlaunch.server.__main__: exiting: engine failed: CUDA error: out of memory"


class Actors:
    """Every placement group placed at once; prefill-0's rank 0 ends with exit code 1 once it started."""

    def place(self, run: RayRun) -> None:
        run.state = "placing"

    def placed(self, run: RayRun) -> bool:
        return True

    def launch(self, run: RayRun, prefill_side_channels: str) -> bool:
        run.spec = run.plan.spec.model_copy(update={"host": "10.0.0.2"})
        run.state, run.serve_ref = "starting", f"serve-{run.name}"
        return True

    def exit_of(self, run: RayRun) -> str | None:
        return "exited with code 1" if run.name == "prefill-0" and run.serve_ref is not None else None

    def remove(self, run: RayRun) -> None:
        run.serve_ref = None

    def stop(self, runs: list[RayRun], drain: bool, hurry: object) -> None:
        pass


def _failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RayDeployment:
    deployment = deployment_on(FakeRay(), tmp_path, monkeypatch)
    deployment.actors = Actors()  # type: ignore[assignment]
    monkeypatch.setattr(ray_deployment, "POLL_S", 0.01)
    monkeypatch.setattr(backend, "POLL_S", 0.01)
    monkeypatch.setattr(deployment, "answers", lambda run: False)
    monkeypatch.setattr(backend, "RayDeployment", lambda cfg, console: deployment)
    monkeypatch.setattr(backend, "resolve_model_path", lambda path, say: Path(path))
    prefill = deployment.runs[0]
    prefill.log_path.parent.mkdir(parents=True, exist_ok=True)
    prefill.log_path.write_text("".join(f"INFO prefill-0 loading layer {i}\n" for i in range(40)) + CAUSE + "\n")
    return deployment


def _said(capsys: pytest.CaptureFixture[str]) -> str:
    return "\n".join(" ".join(line.split()) for line in capsys.readouterr().out.splitlines())


def test_an_instance_failing_while_starting_shows_its_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    deployment = _failing(tmp_path, monkeypatch)
    assert backend.run_ray(ray_cfg(tmp_path)) == 1
    said = _said(capsys)
    log = deployment.runs[0].log_path
    assert "error: prefill-0 exited with code 1 while starting" in said, said
    assert f"last 20 lines of {log}:" in said and CAUSE in said, said
    assert "loading layer 20" not in said and "loading layer 21" in said, said  # the last 20 lines only


def test_an_instance_whose_restarts_are_off_shows_its_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    deployment = _failing(tmp_path, monkeypatch)
    deployment.runs[0].record.restart = False

    def started(should_stop: object) -> bool:
        for run in deployment.runs:
            deployment.actors.launch(run, "")
            run.state = "ready"
        return True

    monkeypatch.setattr(deployment, "start", started)
    monkeypatch.setattr(deployment.proxy, "check", lambda runs, now, policy: None)
    assert backend.run_ray(ray_cfg(tmp_path)) == 1
    said = _said(capsys)
    assert "error: prefill-0 exited with code 1, and restarts are off for it (instances[0].restart: false)" in said
    assert f"last 20 lines of {deployment.runs[0].log_path}:" in said and CAUSE in said, said
