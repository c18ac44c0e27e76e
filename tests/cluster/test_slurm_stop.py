"""How `pdlaunch serve --backend slurm` ends under `salloc` on a real SLURM cluster (slurmctld + two slurmd nodes
on this machine, tests/cluster/slurm_cluster.py), when the user's stop is not the plain one: the launcher
SIGKILLed (the OOM killer, kill -9) must not leave its steps serving in the allocation, a second Ctrl-C
must end the steps without waiting for a node's drain, and a step whose srun client hangs (the launcher
SIGKILLs the client) must be cancelled through SLURM, not left in the allocation.

The launcher runs as in a user's salloc shell: `salloc --nodes=2 bash -c '...'` starts it in the background
and the shell lives on after it, so the allocation (and anything left in it) stays until scancel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster.slurm_cluster import SlurmCluster, running_slurm
from tests.helpers.pids import signal_pid
from tests.helpers.ports import free_ports
from tests.serving.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300.0  # slurm steps, then two launchers importing torch and building engines on 2 cores
STOP_TIMEOUT_S = 120.0  # every node drains (up to 5 s) and stops its processes
# salloc's command, as a user's shell: the launcher ("$@") in the background, its pid and exit code in files;
# then the shell lives on, holding the allocation (salloc gives it a process group of its own).
SHELL = ('echo "$SLURM_JOB_ID" > job; echo $$ > shell.pid; "$@" > launcher.out 2>&1 & echo $! > launcher.pid; '
         'wait $!; echo $? > launcher.exit; sleep 3600')


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    yield from running_slurm(tmp_path_factory.mktemp("slurm"))


def write_config(tmp: Path, model: Path) -> tuple[Path, str]:
    """A colocated instance on each node (no KV transfer: nothing but the stop is under test), the proxy
    on node 0; the config's path and the proxy's URL."""
    proxy_port, node0_port, node1_port = free_ports(3)
    config = tmp / "pd.yaml"
    config.write_text(f"""\
launcher: {{backend: slurm}}
colocated: true
device: cpu
model: {{path: "{model}"}}
cache: {{num_gpu_blocks: 64}}
proxy: {{host: 127.0.0.1, port: {proxy_port}}}
log_dir: {tmp / "logs"}
parallel: {{nodes: [{{address: 127.0.0.1}}, {{address: 127.0.0.1}}]}}
instances:
  - {{role: colocated, count: 1, tp: 1, node: 0, base_port: {node0_port}}}
  - {{role: colocated, count: 1, tp: 1, node: 1, base_port: {node1_port}}}
""")
    return config, f"http://127.0.0.1:{proxy_port}"


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


class Salloc:
    """`salloc --nodes=2` running `argv` (the launcher) the way SHELL does, in `tmp`."""

    def __init__(self, slurm: SlurmCluster, argv: list[str], tmp: Path) -> None:
        self.slurm, self.tmp = slurm, tmp
        env = {**slurm.env, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self._out = open(tmp / "salloc.out", "wb")
        self.proc = subprocess.Popen(["salloc", "--nodes=2", "bash", "-c", SHELL, "bash", *argv], cwd=tmp, env=env,
                                     stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.job = wait_for(lambda: self._read("job"), "salloc to grant the allocation", 60.0)
        self.launcher_pid = int(wait_for(lambda: self._read("launcher.pid"), "the launcher to start", 60.0))

    def _read(self, name: str) -> str:
        path = self.tmp / name
        return path.read_text().strip() if path.exists() else ""

    @property
    def output(self) -> str:
        return self._read("launcher.out")

    @property
    def exit_code(self) -> int | None:
        """The launcher's exit status as the shell saw it (137: SIGKILL), None while it runs."""
        code = self._read("launcher.exit")
        return int(code) if code else None

    def steps(self) -> list[str]:
        """The job's pdlaunch steps still known to slurmctld ("ID NAME")."""
        listed = self.slurm.run("squeue", "--noheader", "--steps", "--jobs", self.job, "--format=%i %j")
        return [line.strip() for line in listed.splitlines() if "pdlaunch-node" in line]

    def wait_ready(self, url: str) -> None:
        """Until the proxy answers and the launcher has said so: a Ctrl-C before its own probe saw the proxy
        is one "while starting", another path than the one a test means to take."""
        def ready() -> bool:
            assert self.exit_code is None, f"the launcher exited with {self.exit_code}:\n{self.output}"
            return answers(url) and "ready: OpenAI API at" in self.output

        wait_for(ready, f"the proxy at {url} to answer under salloc and the launcher to say so", START_TIMEOUT_S,
                 poll=1.0)

    def close(self) -> None:
        """scancel the job (what the user had to do before) and wait for its steps to end, so that none is
        left behind once the cluster's daemons stop; then end salloc and its shell."""
        subprocess.run(["scancel", self.job], env=self.slurm.env, timeout=30)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.slurm.job_state(self.job).get("JobState") in ("RUNNING", "COMPLETING"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for group in filter(None, (self._read("shell.pid"), str(self.proc.pid))):
            try:
                os.killpg(int(group), signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)
        self._out.close()


@pytest.fixture
def salloc_serve(slurm: SlurmCluster, llama_ckpt: Path, tmp_path: Path) -> Iterator[tuple[Salloc, str]]:
    """`pdlaunch serve CONFIG` started in a salloc shell, once its proxy answers: (the allocation, the proxy's URL)."""
    config, url = write_config(tmp_path, llama_ckpt)
    allocation = Salloc(slurm, [sys.executable, "-m", "pdlaunch", "serve", str(config)], tmp_path)
    try:
        allocation.wait_ready(url)
        yield allocation, url
    finally:
        allocation.close()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_sigkilled_launcher_leaves_no_step_running(salloc_serve: tuple[Salloc, str], tmp_path: Path) -> None:
    """kill -9 of the launcher: its srun clients were orphaned and kept every node's step, instances and
    proxy serving in the allocation until a scancel. Now each srun gets SIGUSR1 as the launcher dies (the
    Ctrl-C stop): every node drains and stops, the steps end, the proxy's port closes."""
    allocation, url = salloc_serve
    assert len(allocation.steps()) == 2, allocation.steps()
    os.kill(allocation.launcher_pid, signal.SIGKILL)
    wait_for(lambda: allocation.exit_code is not None, "the shell to see the launcher end", 30.0)
    assert allocation.exit_code == 128 + signal.SIGKILL

    wait_for(lambda: not allocation.steps(), f"job {allocation.job}'s pdlaunch steps to end after the launcher's "
             "SIGKILL (they ran on until scancel)", STOP_TIMEOUT_S, poll=0.5)
    wait_for(lambda: not answers(url), f"the proxy at {url} to stop answering", STOP_TIMEOUT_S, poll=0.5)
    for node in (0, 1):  # each node stopped as on Ctrl-C (its drain), not killed by SLURM
        node_out = (tmp_path / "logs" / f"slurm-node{node}.log").read_text(errors="replace")
        assert "stopped: all processes reaped" in node_out, node_out
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "logs")], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the deployment left: {left}"
    assert allocation.slurm.job_state(allocation.job).get("JobState") == "RUNNING", "the allocation itself lives on"


def node_launcher_pid(job: str, node: int) -> int | None:
    """The pid of node `node`'s launcher (slurm_node, its srun step's task) in job `job`, None if none runs
    (not its srun client, whose arguments end with the same command)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (argv[1:5] == [b"-m", b"pdlaunch.launcher.backends.slurm_node", b"--node-rank", str(node).encode()]
                and f"SLURM_JOB_ID={job}".encode() in environ):
            return int(proc.name)
    return None


# `pdlaunch serve`, with the launcher's wait for the nodes' drain (60 s) longer than the test: only the second
# Ctrl-C can end it.
PATIENT_LAUNCHER = ("from pdlaunch.launcher.backends import slurm; slurm.STEP_STOP_TIMEOUT_S = 3600.0; "
                    "from pdlaunch.cli import main; main()")


@pytest.mark.e2e
@pytest.mark.slow
def test_a_second_ctrl_c_ends_the_steps_without_waiting_for_the_drain(slurm: SlurmCluster, llama_ckpt: Path,
                                                                       tmp_path: Path) -> None:
    """Ctrl-C, then Ctrl-C again while a node's drain hangs (its launcher stopped with SIGSTOP): the launcher
    waited up to 60 s for it whatever the user pressed. Now the second one ends the steps at once (SIGTERM to
    srun, which kills its step), as `pdlaunch serve` does: node 1 drained, node 0 was ended, nothing is left."""
    config, url = write_config(tmp_path, llama_ckpt)
    allocation = Salloc(slurm, [sys.executable, "-c", PATIENT_LAUNCHER, "serve", str(config)], tmp_path)
    hung: int | None = None
    try:
        allocation.wait_ready(url)
        hung = wait_for(lambda: node_launcher_pid(allocation.job, 0), "node 0's launcher process", 30.0)
        os.kill(hung, signal.SIGSTOP)
        os.kill(allocation.launcher_pid, signal.SIGINT)
        wait_for(lambda: "received: stopping every node" in allocation.output, "the launcher to stop the nodes", 60.0)
        wait_for(lambda: [step.split()[1] for step in allocation.steps()] == ["pdlaunch-node0"],
                 "node 1 to drain and its step to end, node 0's to hang", STOP_TIMEOUT_S, poll=0.5)

        os.kill(allocation.launcher_pid, signal.SIGINT)
        wait_for(lambda: allocation.exit_code is not None, "the launcher to exit after the second Ctrl-C (it waited "
                 "for node 0's drain)", STOP_TIMEOUT_S, poll=0.5)
        text = allocation.output
        assert allocation.exit_code == 0, text
        assert "second signal: stopping now" in text and "stopped: every srun step ended" in text, text
        assert "SLURM cancelled" not in text, text  # slurmstepd's line for the kill srun asked for is no scancel
        wait_for(lambda: not allocation.steps(), "node 0's step to leave squeue", STOP_TIMEOUT_S, poll=0.5)
        wait_for(lambda: not answers(url), f"the proxy at {url} to stop answering", STOP_TIMEOUT_S, poll=0.5)
        node0, node1 = ((tmp_path / "logs" / f"slurm-node{k}.log").read_text(errors="replace") for k in (0, 1))
        assert "stopped: all processes reaped" in node1, node1
        assert "stopped: all processes reaped" not in node0, node0  # ended by the hurry, not by its drain
    finally:
        if hung is not None:
            signal_pid(hung, signal.SIGCONT)
        allocation.close()


def srun_client_pid(launcher: int, node: int) -> int | None:
    """The pid of node `node`'s srun client, the launcher's child (not srun's shepherd, its forked child with the
    same arguments, which cancels the step if srun dies unless it is killed too), None if none runs."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and argv[0] == b"srun" and f"--relative={node}".encode() in argv:
            return int(proc.name)
    return None


def is_srun(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"srun\0")
    except OSError:
        return False


@pytest.mark.e2e
@pytest.mark.slow
def test_a_step_whose_srun_client_had_to_be_killed_is_cancelled(slurm: SlurmCluster, llama_ckpt: Path,
                                                                  tmp_path: Path) -> None:
    """Node 0's srun client hangs (SIGSTOP: a stuck client, a slow slurmctld): on the stop it forwards no SIGUSR1
    and does not kill its step on SIGTERM, and the launcher's SIGKILL ended the client (and its shepherd) only.
    The step ran on in the allocation with node 0's instance and the proxy until a scancel. Now the launcher
    cancels that step through SLURM, says so, and nothing of the deployment is left."""
    config, url = write_config(tmp_path, llama_ckpt)
    allocation = Salloc(slurm, [sys.executable, "-m", "pdlaunch", "serve", str(config)], tmp_path)
    hung: int | None = None
    try:
        allocation.wait_ready(url)
        node0_step = next(step.split()[0] for step in allocation.steps() if step.endswith(" pdlaunch-node0"))
        hung = wait_for(lambda: srun_client_pid(allocation.launcher_pid, 0), "node 0's srun client", 30.0)
        os.kill(hung, signal.SIGSTOP)
        os.kill(allocation.launcher_pid, signal.SIGINT)
        wait_for(lambda: [step.split()[1] for step in allocation.steps()] == ["pdlaunch-node0"],
                 "node 1 to drain and its step to end, node 0's to stay (its srun forwards nothing)",
                 STOP_TIMEOUT_S, poll=0.5)
        os.kill(allocation.launcher_pid, signal.SIGINT)  # skip the wait for node 0's drain, which never comes
        wait_for(lambda: allocation.exit_code is not None, "the launcher to exit after the second Ctrl-C",
                 STOP_TIMEOUT_S, poll=0.5)
        wait_for(lambda: not allocation.steps(), f"node 0's step {node0_step} to leave squeue (its srun client was "
                 f"SIGKILLed and the step ran on in the allocation):\n{allocation.output}", STOP_TIMEOUT_S, poll=0.5)
        wait_for(lambda: not answers(url), f"the proxy at {url} to stop answering", STOP_TIMEOUT_S, poll=0.5)
        text = " ".join(allocation.output.split())
        assert allocation.exit_code == 0, text
        assert (f"node 0's srun client was killed by signal 9 (SIGKILL) and left its step {node0_step} running in job "
                f"{allocation.job}: cancelling it (scancel {node0_step})") in text, text
        assert f"stopped: every srun step ended (cancelled through SLURM: {node0_step})" in text, text
        assert "Traceback" not in text, text
        left = subprocess.run(["pgrep", "-f", str(tmp_path / "logs")], capture_output=True, text=True).stdout.split()
        assert not left, f"processes of the deployment left: {left}"
        assert allocation.slurm.job_state(allocation.job).get("JobState") == "RUNNING", "the allocation lives on"
    finally:
        if hung is not None and is_srun(hung):  # the launcher SIGKILLs it; if it did not, do not leave it stopped
            signal_pid(hung, signal.SIGCONT)
            signal_pid(hung, signal.SIGKILL)
        allocation.close()
