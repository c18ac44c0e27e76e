"""`pdlaunch serve --backend slurm` and `--backend ray` whose own output cannot be written (the batch script's
`#SBATCH --output` file on a disk that filled up, `pdlaunch serve --backend ray | tee serve.log` with tee gone)
serve and stop as with room: their status lines raised ENOSPC/EPIPE out of the launcher, which then stopped every
step or actor though they served fine (`pdlaunch serve` itself writes through launcher/output.py since 49f01665;
these two launchers built their own consoles on sys.stdout). /dev/full answers every write with ENOSPC."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pdlaunch.launcher.backends.slurm import run_slurm
from pdlaunch.launcher.log_dir_lock import log_dir_holder
from tests.cluster.test_slurm_node_lines import alive, cfg, fake_dir  # noqa: F401 (the `fake_dir` fixture)
from tests.serving.helpers import wait_for

FULL = Path("/dev/full")
pytestmark = pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full (Linux)")


@contextmanager
def stdout_on_full_disk() -> Iterator[None]:
    """sys.stdout on /dev/full while it lasts. Set in the test's body: pytest's capture puts its own sys.stdout
    back after a fixture's setup."""
    full = open(FULL, "w")  # noqa: SIM115  # closed below, once stdout is back
    real, sys.stdout = sys.stdout, full
    try:
        yield
    finally:
        sys.stdout = real
        try:
            full.close()
        except OSError:
            pass  # what stayed in its buffer cannot be written either


def test_the_slurm_batch_process_serves_and_stops_cleanly_with_its_output_on_a_full_disk(
        fake_dir: Path, term_guard: None) -> None:  # noqa: F811 (the fixture)
    logs = fake_dir / "logs"

    def stop_once_both_steps_run() -> None:
        wait_for(lambda: len(list(fake_dir.glob("srun-*.pid"))) == 2, "both srun steps to start", 60.0)
        os.kill(os.getpid(), signal.SIGTERM)  # the user's stop

    thread = threading.Thread(target=stop_once_both_steps_run, daemon=True)
    thread.start()
    with stdout_on_full_disk():
        assert run_slurm(cfg(logs)) == 0
    thread.join(60.0)
    assert log_dir_holder(logs) is None, "the lock outlived the deployment"
    assert not alive(fake_dir), "a step was left running"


def test_the_ray_launcher_stops_cleanly_with_its_output_on_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, term_guard: None) -> None:
    pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")
    from pdlaunch.launcher.backends import ray as backend
    from tests.cluster.test_backend_failures_ray import FakeRay, deployment_on, ray_cfg
    from tests.helpers.slow_fetch import slow_fetch_interrupted

    slow_fetch_interrupted(monkeypatch, 20.0)  # a SIGTERM while the model is fetched: its line goes to stdout
    fake = FakeRay()
    deployment = deployment_on(fake, tmp_path, monkeypatch)
    deployment.cfg.model.path = "tiny"
    monkeypatch.setattr(backend, "RayDeployment", lambda cfg, console: deployment)
    with stdout_on_full_disk():
        assert backend.run_ray(ray_cfg(tmp_path)) == 0
    assert log_dir_holder(deployment.log_dir) is None and fake.calls[-1] == "shutdown", fake.calls
