"""A TP rank that node K's launcher runs for an instance whose rank 0 is on another node ends when that launcher is
killed (SIGKILL, an out-of-memory kill): it has no --parent-pid watch as instances and the proxy have, and while it
waits for rank 0's rendezvous store (up to 15 minutes) it cannot act on a SIGTERM either. It used to run on, holding
its device and a place in its TP group, so that the launcher started again on that node found its rank taken.

No GPU is needed: on CPU a node's `devices` are rank slots, so a TP 2 group on a node that lists one spans to the
next node. Node 1's launcher runs here alone; rank 0 (node 0) never comes, so its rank waits for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from pdlaunch.config.rules.security import SECRET_ENV
from tests.helpers.pids import signal_pid
from tests.launcher.free_ports import free_on_both
from tests.serving.e2e import alive
from tests.serving.helpers import wait_for

SECRET = "rank-parent-death-test-secret-0123"
START_TIMEOUT_S = 120.0  # the launcher imports torch on a loaded 2-core machine
RANK_MODULE = b"pdlaunch.distributed.remote_rank"


def _ranks_of(launcher: int) -> list[int]:
    """Pids of the remote-rank processes whose parent is `launcher`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher and RANK_MODULE in cmdline:
            pids.append(int(entry.name))
    return pids


def test_a_remote_rank_ends_when_its_launcher_is_killed(tmp_path: Path) -> None:
    base = free_on_both(2, "rendezvous and instance ports")
    config = {"device": "cpu", "model": {"path": "tiny"}, "colocated": True,
              "parallel": {"nodes": [{"address": "127.0.0.1", "devices": [0]}, {"address": "127.0.0.2"}],
                           "master_port": base},
              "instances": [{"role": "colocated", "tp": 2, "base_port": base + 1}]}
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "serve.out"
    with open(out, "wb") as sink:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "pdlaunch", "serve", str(path), "--node-rank", "1", "--log-dir",
             str(tmp_path / "logs")], stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, SECRET_ENV: SECRET})
    ranks: list[int] = []
    try:
        def started() -> list[int]:
            assert launcher.poll() is None, f"the launcher exited with {launcher.returncode}:\n{out.read_text()}"
            return _ranks_of(launcher.pid)

        ranks = wait_for(started, "node 1's launcher to start its rank of colocated-0", START_TIMEOUT_S, poll=0.2)
        launcher.kill()
        launcher.wait(30)
        wait_for(lambda: not alive(ranks), f"rank process(es) {ranks} to end after their launcher's SIGKILL", 30.0)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(30)
        for pid in ranks:
            signal_pid(pid, signal.SIGKILL)
