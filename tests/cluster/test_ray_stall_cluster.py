"""`--backend ray` on a real Ray cluster of three raylets on this machine (tests/cluster/ray_cluster.py): an instance
whose rank-0 actor process is frozen (SIGSTOP: alive, its /health unanswered) is said to be stalled, and after
supervision.stall_restart_seconds its actors are killed (the frozen process too), its placement group removed, and
it is placed and started again; the service answers again and the stop leaves nothing on the cluster. The unit
tests (test_ray_stall.py) cover the decisions; this one, that Ray ends a stopped actor and the restart serves. Then
the restarted rank-0 actor process is killed with SIGKILL from outside, as the OOM killer would: the launcher names
the OOM killer on its node from Ray's death cause (ray_killed.py; test_ray_outside_kill.py for the wording), not
Ray's paragraph, and restarts it again."""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster.ray_cluster import RayCluster, running_ray
from tests.cluster.test_ray_stop import EXIT_TIMEOUT_S, START_TIMEOUT_S, Launcher
from tests.helpers.pids import pid_alive, signal_pid
from tests.multinode.two_node_run import PROMPTS, completion
from tests.serving.helpers import wait_for

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

STALL_RESTART_S = 5


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    yield from running_ray()


def _rank0_pids(launcher: Launcher) -> list[int]:
    """The decode's RayInstance actor processes, each start's, as its log names them."""
    log = (launcher.logs / "decode-0.log").read_text(errors="replace")
    return [int(pid) for pid in re.findall(r"decode-0: rank 0 actor on \S+ \(pid (\d+)\)", log)]


def _answers(launcher: Launcher) -> bool:
    try:
        with httpx.Client(timeout=60, trust_env=False) as client:
            completion(client, launcher.proxy, launcher.ckpt, PROMPTS[0], 4)
        return True
    except (AssertionError, httpx.HTTPError):
        return False


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_frozen_instance_is_restarted_after_stall_restart_seconds(cluster: RayCluster, llama_ckpt: Path,
                                                                    tmp_path: Path) -> None:
    launcher = Launcher(cluster, llama_ckpt, tmp_path, [sys.executable, "-m", "pdlaunch"],
                        supervision=f"{{stall_restart_seconds: {STALL_RESTART_S}, restart_backoff_seconds: 0.5}}")
    try:
        launcher.wait_ready()
        frozen = launcher.decode_rank0_pid()
        signal_pid(frozen, signal.SIGSTOP)
        wait_for(lambda: launcher.said("decode-0 is stalled: its Ray actor is alive"), "the stall to be said",
                 EXIT_TIMEOUT_S, poll=0.5)
        wait_for(lambda: launcher.said(f"supervision.stall_restart_seconds: {STALL_RESTART_S}); its actors and "
                                       "placement group are removed"), "the stalled decode to be ended",
                 EXIT_TIMEOUT_S, poll=0.5)
        wait_for(lambda: not pid_alive(frozen), "the frozen actor process to be killed", EXIT_TIMEOUT_S, poll=0.5)
        wait_for(lambda: launcher.said("decode-0 is ready again after restart 1"), "the decode's restart",
                 START_TIMEOUT_S, poll=1.0)
        wait_for(lambda: _answers(launcher), "an answer through the proxy after the restart", EXIT_TIMEOUT_S,
                 poll=1.0)

        killed = _rank0_pids(launcher)[-1]  # restart 1's actor process
        signal_pid(killed, signal.SIGKILL)
        wait_for(lambda: launcher.said("decode-0 lost its Ray actor (a SIGKILL pdlaunch did not send: most often the "
                                       "kernel's OOM killer on node "), "the outside kill to be said", EXIT_TIMEOUT_S,
                 poll=0.5)
        wait_for(lambda: launcher.said("decode-0 is ready again after restart 2"), "the decode's second restart",
                 START_TIMEOUT_S, poll=1.0)
        lost = next(line for line in launcher.output.splitlines() if "decode-0 lost its Ray actor" in line)
        assert "Some common causes include" not in lost, lost  # Ray's paragraph: its raylet prints it on its own line
        launcher.proc.send_signal(signal.SIGINT)
        assert launcher.proc.wait(EXIT_TIMEOUT_S) == 0, launcher.output
        launcher.assert_nothing_left()
    finally:
        launcher.close()
