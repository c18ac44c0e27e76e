"""`--backend slurm` when SLURM ends the deployment (launcher/backends/slurm.py), with a stand-in `srun` on
PATH that writes what slurmstepd and srun write when a node fails, the time limit passes or the job is
cancelled (the lines as Slurm 23 prints them, seen on tests/cluster/slurm_cluster.py). The launcher must
say why (the node, the job, SLURM's reason) instead of a clean-looking stop, exit 1 for a failure, and
leave no step running. Fast: no cluster, no engine; a stand-in proxy answers /health. Stand-in `scontrol` and
`scancel` play slurmctld's side: the steps still in the job, and the cancel of those a killed srun left."""

from __future__ import annotations

import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.backends import slurm, slurm_steps
from pdlaunch.launcher.backends.slurm import run_slurm
from tests.helpers.pids import pid_alive, signal_pid
from tests.serving.helpers import wait_for

JOB = "7"
NODE_FAILURE = ["srun: error: Node failure on pdn2",
                "slurmstepd-pdn1: error: *** STEP 7.1 ON pdn2 CANCELLED AT 2026-11-28T11:16:47 DUE TO NODE FAILURE, "
                "SEE SLURMCTLD LOG FOR DETAILS ***"]

# srun --nodes=1 --ntasks=1 --relative=K --job-name=NAME ...: node K's step. FAKE_DIR/mode-K picks what it does:
# "nodefail" (srun's and slurmstepd's lines, exit 1, as when SLURM loses the node), else it runs until SIGUSR1
# (the launcher's stop: FAKE_DIR/asked-K, then exit 0; with "draining", a drain that never ends: it runs on).
# SIGTERM is SLURM ending the step: slurmstepd's line (with FAKE_DIR/due as its reason when that file
# exists), and the step goes on until the launcher stops it, as a node draining does.
# Its step, 7.(10+K), is in the job (FAKE_DIR/steps/ID: "NAME SRUN_PID") until it exits; a SIGKILLed one
# leaves it there, as a real srun client's leaves its step running.
FAKE_SRUN = r"""#!/bin/bash
for a in "$@"; do case $a in --relative=*) k=${a#--relative=} ;; --job-name=*) name=${a#--job-name=} ;; esac; done
step="$FAKE_DIR/steps/$SLURM_JOB_ID.$((10 + k))"
echo "$name $$" > "$step"
trap 'rm -f "$step"' EXIT
mode=$(cat "$FAKE_DIR/mode-$k" 2>/dev/null)
if [ "$mode" = nodefail ]; then
  echo $$ > "$FAKE_DIR/srun-$k.pid"
  cat "$FAKE_DIR/nodefail"
  exit 1
fi
due=$(cat "$FAKE_DIR/due" 2>/dev/null)
n=pdn$((k + 1))
line="slurmstepd-$n: error: *** STEP 7.$k ON $n CANCELLED AT 2026-11-28T11:19:02${due:+ DUE TO $due} ***"
trap 'echo "$line"' TERM
trap 'touch "$FAKE_DIR/asked-$k"; [ "$mode" = draining ] || exit 0' USR1
echo $$ > "$FAKE_DIR/srun-$k.pid"  # the tests signal it once this file exists: the traps are in place
while :; do sleep 0.1 & wait $!; done
"""

# scontrol show step JOB --oneliner: the steps in FAKE_DIR/steps, in Slurm 22.05's words (exit 1 when none)
FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_DIR/slurm-calls"
shopt -s nullglob
steps=("$FAKE_DIR"/steps/*)
[ ${#steps[@]} = 0 ] && { echo "Job step $3. not found"; exit 1; }
for f in "${steps[@]}"; do
  read -r name pid < "$f"
  echo "StepId=${f##*/} UserId=0 StartTime=2026-11-28T13:50:04 TimeLimit=UNLIMITED State=RUNNING Partition=pd" \
       "NodeList=pdn1 Nodes=1 CPUs=1 Tasks=1 Name=$name Network=(null) TRES=cpu=1,mem=0,node=1" \
       "ResvPorts=(null) CPUFreqReq=Default Dist=Cyclic SrunHost:Pid=login1:$pid"
done
"""
# scancel JOB.STEP: the step leaves the job; with FAKE_DIR/scancel-fails, slurmctld refuses; with
# FAKE_DIR/scancel-late, it refuses because the step is ending by itself, and it leaves the job
FAKE_SCANCEL = r"""#!/bin/bash
echo "scancel $*" >> "$FAKE_DIR/slurm-calls"
if [ -e "$FAKE_DIR/scancel-late" ]; then
  rm -f "$FAKE_DIR/steps/$1"
  echo "scancel: error: Kill job error on job step id $1: Job/step already completing or completed" >&2
  exit 1
fi
if [ -e "$FAKE_DIR/scancel-fails" ]; then
  echo "scancel: error: Kill job error on job step id $1: Access/permission denied" >&2
  exit 1
fi
rm -f "$FAKE_DIR/steps/$1"
"""


class _Health(BaseHTTPRequestHandler):
    probes: list[str] = []  # the paths asked, in order

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.probes.append(self.path)
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """FAKE_DIR holding the stand-in srun, scontrol and scancel (first on PATH) and their controls;
    SLURM_JOB_ID set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "steps").mkdir()
    for name, script in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL)):
        path = bin_dir / name
        path.write_text(script)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "nodefail").write_text("\n".join(NODE_FAILURE) + "\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    # The stand-in proxy listens at node 0's proxy port before the launcher starts: its probe of the nodes'
    # ports (tests/config/test_node_ports.py) would stop it there.
    monkeypatch.setattr(slurm, "check_node_ports", lambda cfg: [])
    return tmp_path


@pytest.fixture
def proxy_port() -> Iterator[int]:
    """A stand-in for node 0's proxy: /health answers 200."""
    _Health.probes.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def slurm_cfg(logs: Path, proxy_port: int) -> DeploymentConfig:
    return DeploymentConfig.model_validate({
        "launcher": {"backend": "slurm"}, "log_dir": str(logs), "proxy": {"host": "0.0.0.0", "port": proxy_port},
        "parallel": {"nodes": [{"address": "127.0.0.1"}, {"address": "127.0.0.2"}]}})


def srun_pids(fake_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(fake_dir.glob("srun-*.pid")) if p.read_text().strip()]


def both_started(fake_dir: Path) -> bool:
    return len(srun_pids(fake_dir)) == 2


def slurm_signals_the_steps(fake_dir: Path, logs: Path) -> None:
    """What slurmctld does when it ends the job: every step is signalled and slurmstepd says why."""
    for pid in srun_pids(fake_dir):
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: all("CANCELLED AT" in (logs / f"slurm-node{k}.log").read_text() for k in (0, 1)),
             "slurmstepd's line in both steps' output", 30.0)


def steps_left_running(fake_dir: Path) -> list[int]:
    """Waits up to 60 s for the stand-in steps to end; those still running then (the launcher did not end
    them), SIGKILLed here so that none outlives the test."""
    try:
        wait_for(lambda: not [pid for pid in srun_pids(fake_dir) if pid_alive(pid)], "the steps to end", 60.0)
        return []
    except AssertionError:
        left = srun_pids(fake_dir)
        for pid in left:
            signal_pid(pid, signal.SIGKILL)
        return left


def said(capsys: pytest.CaptureFixture[str]) -> str:
    out = capsys.readouterr()
    return " ".join((out.out + out.err).split())


def run_while(action: Callable[[], None], logs: Path, proxy_port: int,
              capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The SLURM launcher's exit code and what it printed, with `action` (what SLURM or the user does to the
    running job) on a thread beside it."""
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    code = run_slurm(slurm_cfg(logs, proxy_port))
    thread.join(60.0)
    return code, said(capsys)


def test_a_node_failure_names_the_node_the_job_and_the_reason(fake_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Node 1's step ends because SLURM lost its node: the error names node 1's address, the job and
    `node failure on pdn2` (it said only "node 1's srun step exited with code 1"); node 0's step is stopped."""
    (fake_dir / "mode-1").write_text("nodefail")
    closed = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    port = int(closed.server_address[1])
    closed.server_close()  # nothing answers: the launcher is still starting when node 1 fails

    assert run_slurm(slurm_cfg(tmp_path / "logs", port)) == 1
    text = said(capsys)
    assert "node 1's srun step (on 127.0.0.2, job 7) exited with code 1 while starting" in text, text
    assert "node failure on pdn2" in text and "SLURM cancelled step 7.1 on pdn2 due to node failure" in text, text
    assert "Traceback" not in text, text
    assert not [pid for pid in srun_pids(fake_dir) if pid_alive(pid)], "a step was left running"


@pytest.mark.parametrize("due", ["TIME LIMIT", "NODE FAILURE"])
def test_slurm_ending_the_job_is_an_error_not_a_clean_stop(fake_dir: Path, tmp_path: Path, proxy_port: int,
                                                          term_guard: None, due: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """SLURM ends the running job (time limit, node failure): it signals every step and the batch script at
    once. The launcher exits 1 naming the job and SLURM's reason (it printed "SIGTERM received" and exit 0)."""
    (fake_dir / "due").write_text(due)

    def slurm_ends_the_job() -> None:
        wait_for(lambda: both_started(fake_dir), "both srun steps to start", 60.0)
        slurm_signals_the_steps(fake_dir, tmp_path / "logs")
        os.kill(os.getpid(), signal.SIGTERM)  # the batch script's signal

    code, text = run_while(slurm_ends_the_job, tmp_path / "logs", proxy_port, capsys)
    assert code == 1, text
    assert f"SLURM ended job 7: SLURM cancelled step 7.0 on pdn1 due to {due.lower()}" in text, text
    assert "stopped: every srun step ended" in text and "Traceback" not in text, text
    assert not [pid for pid in srun_pids(fake_dir) if pid_alive(pid)], "a step was left running"


@pytest.mark.parametrize("slurm_signals_steps", [True, False], ids=["scancel", "scancel-batch"])
def test_a_cancelled_job_stops_with_exit_0(fake_dir: Path, tmp_path: Path, proxy_port: int, term_guard: None,
                                          slurm_signals_steps: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """A plain `scancel` (SLURM signals the steps too) and `scancel --signal=TERM --batch` (only the launcher)
    are the user's stop: exit 0; the first says SLURM cancelled the job."""

    def user_cancels() -> None:
        wait_for(lambda: both_started(fake_dir), "both srun steps to start", 60.0)
        if slurm_signals_steps:
            slurm_signals_the_steps(fake_dir, tmp_path / "logs")
        os.kill(os.getpid(), signal.SIGTERM)

    code, text = run_while(user_cancels, tmp_path / "logs", proxy_port, capsys)
    assert code == 0, text
    assert ("job 7: SLURM cancelled step 7.0 on pdn1 (scancel)" in text) == slurm_signals_steps, text
    assert "error" not in text, text
    assert not [pid for pid in srun_pids(fake_dir) if pid_alive(pid)], "a step was left running"


def test_an_http_proxy_in_the_environment_does_not_hide_the_deployments_proxy(
        fake_dir: Path, tmp_path: Path, proxy_port: int, term_guard: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Clusters often set http_proxy for downloads: the readiness probe of node 0's proxy went through it,
    never reached the proxy, and the launcher gave up after 900 s saying the proxy did not answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens: a proxy this node cannot use
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    def stop_once_probed() -> None:
        try:
            wait_for(lambda: "/health" in _Health.probes, "the launcher's probe of the proxy's /health", 20.0)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    code, text = run_while(stop_once_probed, tmp_path / "logs", proxy_port, capsys)
    assert "/health" in _Health.probes, text
    assert code == 0 and "ready: OpenAI API at" in text, text


def test_a_second_signal_ends_the_steps_without_waiting_for_the_drain(
        fake_dir: Path, tmp_path: Path, proxy_port: int, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C, then Ctrl-C again while the nodes drain: the launcher waited for the drain (up to 60 s) whatever
    the user pressed. Now it ends the steps at once (SIGTERM to srun, then SIGKILL), as `pdlaunch serve` does.
    Here the drain never ends; the test ends the steps itself only if the launcher did not (and fails)."""
    for k in (0, 1):
        (fake_dir / f"mode-{k}").write_text("draining")
    monkeypatch.setattr(slurm, "STEP_STOP_TIMEOUT_S", 3600.0)
    monkeypatch.setattr(slurm, "STEP_KILL_TIMEOUT_S", 1.0)  # this srun survives SIGTERM (the real one kills its step)
    left_running: list[int] = []

    def user_presses_ctrl_c_twice() -> None:
        wait_for(lambda: both_started(fake_dir), "both srun steps to start", 60.0)
        os.kill(os.getpid(), signal.SIGINT)
        wait_for(lambda: all((fake_dir / f"asked-{k}").exists() for k in (0, 1)), "both nodes asked to stop", 30.0)
        os.kill(os.getpid(), signal.SIGINT)
        left_running.extend(steps_left_running(fake_dir))

    code, text = run_while(user_presses_ctrl_c_twice, tmp_path / "logs", proxy_port, capsys)
    assert not left_running, f"the launcher still waited for the drain after the second signal: {text}"
    assert code == 0, text
    assert "Ctrl-C again to stop at once" in text and "second signal: stopping now" in text, text
    # srun's kill at the launcher's request is no cancellation by SLURM, though slurmstepd says "CANCELLED"
    assert "stopped: every srun step ended" in text and "SLURM cancelled" not in text, text


def test_after_a_failure_one_signal_ends_the_other_steps(
        fake_dir: Path, tmp_path: Path, proxy_port: int, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Node 1's step fails; the launcher stops node 0, whose drain never ends. Nobody asked for that drain, so
    one Ctrl-C ends it (it took two: the first only counted as the request a second one hurries)."""
    (fake_dir / "mode-1").write_text("nodefail")
    (fake_dir / "mode-0").write_text("draining")
    monkeypatch.setattr(slurm, "STEP_STOP_TIMEOUT_S", 3600.0)
    monkeypatch.setattr(slurm, "STEP_KILL_TIMEOUT_S", 1.0)  # this srun survives SIGTERM (the real one kills its step)
    left_running: list[int] = []

    def user_presses_ctrl_c_once() -> None:
        wait_for(lambda: (fake_dir / "asked-0").exists(), "node 0 asked to stop after node 1 failed", 60.0)
        os.kill(os.getpid(), signal.SIGINT)
        left_running.extend(steps_left_running(fake_dir))

    code, text = run_while(user_presses_ctrl_c_once, tmp_path / "logs", proxy_port, capsys)
    assert not left_running, f"one Ctrl-C after the failure did not end the drain: {text}"
    assert code == 1 and "node 1's srun step (on 127.0.0.2, job 7) exited with code 1" in text, text
    assert "stopping the other nodes (up to 3600s); Ctrl-C to stop at once" in text, text
    assert "stopped: every srun step ended" in text and "Traceback" not in text, text


@pytest.mark.parametrize(("environment", "hint"), [("BATCH", "scancel --signal=TERM --batch 7, or Ctrl-C, to stop"),
                                                   (None, "Ctrl-C (or kill -TERM ")])
def test_the_ready_line_names_the_stop_the_user_has(
        fake_dir: Path, tmp_path: Path, proxy_port: int, term_guard: None, monkeypatch: pytest.MonkeyPatch,
        environment: str | None, hint: str, capsys: pytest.CaptureFixture[str]) -> None:
    """In a batch script (sbatch sets ENVIRONMENT=BATCH) a TERM to the batch step stops it; under salloc there
    is no batch step, and the line said `scancel --signal=TERM --batch JOBID` there too."""
    if environment is None:
        monkeypatch.delenv("ENVIRONMENT", raising=False)
    else:
        monkeypatch.setenv("ENVIRONMENT", environment)

    def stop_once_started() -> None:
        wait_for(lambda: both_started(fake_dir) and "/health" in _Health.probes, "the steps and the probe", 60.0)
        os.kill(os.getpid(), signal.SIGTERM)

    code, text = run_while(stop_once_started, tmp_path / "logs", proxy_port, capsys)
    assert code == 0 and hint in text, text


def slurm_calls(fake_dir: Path, command: str) -> list[str]:
    """The arguments each call of the stand-in `command` (scontrol, scancel) was given, in order."""
    path = fake_dir / "slurm-calls"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.removeprefix(f"{command} ") for line in lines if line.startswith(f"{command} ")]


@pytest.mark.parametrize("scancel", ["ok", "fails", "late"])
def test_the_step_of_a_killed_srun_client_is_cancelled_through_slurm(
        fake_dir: Path, tmp_path: Path, proxy_port: int, term_guard: None, monkeypatch: pytest.MonkeyPatch,
        scancel: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Node 0's srun client hangs (SIGSTOP): it forwards no stop and does not end its step on SIGTERM, so the
    launcher SIGKILLs it, and its step ran on in the allocation. Now the launcher scancels exactly that step
    (7.10: node 0's name and srun pid; not node 1's, which ended, nor another launcher's pdlaunch-node0), and
    a scancel that fails is an error naming the step, slurmctld's answer and the command to run by hand; one
    refused because the step was ending by itself is no error, and that step is not called cancelled."""
    monkeypatch.setattr(slurm, "STEP_STOP_TIMEOUT_S", 1.0)
    monkeypatch.setattr(slurm, "STEP_KILL_TIMEOUT_S", 1.0)
    monkeypatch.setattr(slurm_steps, "CANCEL_WAIT_S", 1.0)
    (fake_dir / "steps" / "7.5").write_text("pdlaunch-node0 4242\n")  # another launcher's in the same allocation
    if scancel != "ok":
        (fake_dir / f"scancel-{scancel}").touch()
    hung: list[int] = []

    def srun_hangs_then_user_stops() -> None:
        wait_for(lambda: both_started(fake_dir), "both srun steps to start", 60.0)
        hung.append(int((fake_dir / "srun-0.pid").read_text()))
        os.kill(hung[0], signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        code, text = run_while(srun_hangs_then_user_stops, tmp_path / "logs", proxy_port, capsys)
    finally:
        for pid in hung:  # the launcher SIGKILLs it; if it did not, do not leave it stopped
            signal_pid(pid, signal.SIGCONT)
            signal_pid(pid, signal.SIGKILL)
    assert ("node 0's srun client was killed by signal 9 (SIGKILL) and left its step 7.10 running in job 7: "
            "cancelling it (scancel 7.10)") in text, text
    assert slurm_calls(fake_dir, "scancel") == ["7.10"], text
    assert (fake_dir / "steps" / "7.5").exists(), "another launcher's step was cancelled"
    assert "Traceback" not in text, text
    if scancel == "ok":
        assert code == 0, text
        assert "stopped: every srun step ended (cancelled through SLURM: 7.10)" in text, text
        assert sorted(p.name for p in (fake_dir / "steps").iterdir()) == ["7.5"]
    elif scancel == "late":
        assert code == 0 and "error" not in text, text
        assert "stopped: every srun step ended" in text and "cancelled through SLURM" not in text, text
    else:
        assert code == 1, text
        assert ("error: could not cancel step 7.10 (node 0's) of job 7: `scancel 7.10` exited with code 1: scancel: "
                "error: Kill job error on job step id 7.10: Access/permission denied; run `scancel 7.10` by hand "
                "(`squeue -s -j 7` lists the job's steps)") in text, text
        assert "stopped, but job 7 may still run step 7.10" in text, text
        assert "every srun step ended" not in text, text
