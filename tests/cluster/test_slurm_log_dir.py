"""`--backend slurm` and the log directory's lock (launcher/log_dir_lock.py): the batch process writes
LOG_DIR/slurm-nodeK.log itself, so it holds LOG_DIR's lock from before the first step starts until every step
ended, as `pdlaunch serve` and `--backend ray` do. A second deployment started in the same directory (a second
sbatch job with the default `logs`) is refused before it truncates the live deployment's step logs or starts a
step. The stand-in `srun` is tests/cluster/test_slurm_node_lines.py's."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from pdlaunch.launcher.backends.slurm import run_slurm
from pdlaunch.launcher.log_dir_lock import LogDirInUse, LogDirLock, log_dir_holder
from tests.cluster.test_slurm_node_lines import alive, cfg, fake_dir  # noqa: F401 (the `fake_dir` fixture)
from tests.serving.helpers import wait_for

LIVE_OUTPUT = "node 0: device cuda\nthe live deployment's node 0 serving\n"


def test_a_deployment_in_a_live_log_dir_is_refused_before_any_step(
        fake_dir: Path, term_guard: None) -> None:  # noqa: F811 (the fixture)
    """Before, it truncated the live deployment's slurm-node0.log and started its steps, whose nodes then
    found their own directories locked (or, on a file system without flock, served on beside it)."""
    logs = fake_dir / "logs"
    live = LogDirLock(logs)
    live.acquire("http://10.0.0.1:8000")
    (logs / "slurm-node0.log").write_text(LIVE_OUTPUT)
    (fake_dir / "exit-1").write_text("1")  # without the lock the run ends at once: node 1's step fails
    try:
        with pytest.raises(LogDirInUse, match=r"holds the logs of a running deployment \(pid \d+: .*proxy "
                                              r"http://10\.0\.0\.1:8000\)"):
            run_slurm(cfg(logs))
    finally:
        live.release()
    assert (logs / "slurm-node0.log").read_text() == LIVE_OUTPUT, "the live deployment's step log was truncated"
    assert not list(fake_dir.glob("srun-*.pid")), "a step was started"


def test_the_log_dir_is_held_while_the_steps_run_and_freed_after(
        fake_dir: Path, term_guard: None) -> None:  # noqa: F811 (the fixture)
    logs = fake_dir / "logs"
    seen: list[str | None] = []

    def stop_once_both_steps_run() -> None:
        wait_for(lambda: len(list(fake_dir.glob("srun-*.pid"))) == 2, "both srun steps to start", 60.0)
        seen.append(log_dir_holder(logs))
        os.kill(os.getpid(), signal.SIGTERM)  # the user's stop

    thread = threading.Thread(target=stop_once_both_steps_run, daemon=True)
    thread.start()
    assert run_slurm(cfg(logs)) == 0
    thread.join(60.0)
    assert len(seen) == 1 and seen[0] is not None and seen[0].startswith(f"pid {os.getpid()}: "), seen
    assert log_dir_holder(logs) is None, "the lock outlived the deployment"
    assert not alive(fake_dir), "a step was left running"
