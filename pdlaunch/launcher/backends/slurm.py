"""`--backend slurm`: one `srun` step per node of the allocation, each running that node's launcher.

Inside `sbatch`/`salloc`, config/backend.py has made the allocation's nodes `parallel.nodes`. This
process (the batch script's, or the salloc shell's) probes every node's fixed ports (config/rules/node_ports.py:
something listening at one stops it before any step starts), then starts one step per node,
`srun --nodes=1 --ntasks=1 --relative=K --overlap --export=ALL --gres=gpu:N python -m
pdlaunch.launcher.backends.slurm_node --node-rank K` (N: every GPU the job has on node K, slurm_gres.py; srun's
environment without SRUN_UNSET_ENV, so that srun neither labels the lines the step prints for
this process nor sends them elsewhere than its log; --export=ALL over a batch script's SLURM_EXPORT_ENV=NONE),
which is the multi-node path of `pdlaunch serve --node-rank K` on node K: its instances, its ranks of
TP groups spanning nodes (rendezvous through torch.distributed with the store on the group's first
node), and on node 0 the proxy. The validated config, with one deployment secret for every node,
reaches the steps through their environment (srun passes it on), not a shared file. This process writes
LOG_DIR/slurm-nodeK.log itself and holds LOG_DIR's lock (launcher/log_dir_lock.py) from before the first step
starts until the last has ended. It checks the config only: `device: auto`, CUDA, GPU counts and memory,
sleep mode / the cumem allocator are each node's step's to check on its own machine
(config/validate.checked_on_nodes); the steps say which device they serve on, and a node whose `auto`
resolved otherwise than node 0's stops the deployment (slurm_lines.py).

It waits for the proxy to answer /health, then supervises the steps: each node's launcher restarts
its own instances; a step that ends stops the deployment (exit 1, naming the node and its log; the step's own error
line, `error: node K: FIELD: MESSAGE`, repeated, else its output from its launcher's last error: failure_lines).
SIGINT/SIGTERM (`scancel --signal=TERM --batch`, Ctrl-C under salloc) stop it: it sends each srun
SIGUSR1, which srun forwards to its node's launcher, each node drains and stops its processes, and
this process exits 0 once every step has ended; a second signal meanwhile ends the steps at once
(SIGTERM to srun, which kills its step), as `pdlaunch serve` skips the drain. An srun that does not exit
on SIGTERM (hung, stopped, waiting on a slow slurmctld) is SIGKILLed, which leaves its step running in the
allocation: the launcher then cancels that step through SLURM (`scancel JOB.STEP`) and says so. SLURM sends the same
SIGTERM when it ends the job itself (a node failure, the time limit, preemption, a plain scancel):
slurmstepd and srun then say why in the steps' output, and the launcher repeats it (exit 1 unless the
job was simply cancelled).
If this process dies without stopping the steps (kill -9, the OOM killer), the kernel sends each srun
the same SIGUSR1 (Linux only), so under salloc the nodes still drain and stop as on Ctrl-C.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.markup import escape

from pdlaunch.config.addresses import host_port
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.launcher_config import DRAIN_TIMEOUT_S
from pdlaunch.config.rules.node_ports import check_node_ports
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.backends.slurm_gres import GPU_REQUEST_ENV, NodeGres, gres_option, job_gres_per_node, node_names
from pdlaunch.launcher.backends.slurm_lines import NodeDevices, failure_lines, node_error, show_lines
from pdlaunch.launcher.backends.slurm_steps import SlurmCallError, cancel_left_steps, step_name
from pdlaunch.launcher.log_dir_lock import LogDirLock
from pdlaunch.launcher.log_tail import LogUnreadable
from pdlaunch.launcher.output import LossyOutput
from pdlaunch.launcher.process import ChildProcess, stop_all
from pdlaunch.launcher.readiness import POLL_S, READY_TIMEOUT_S
from pdlaunch.launcher.serve import LOG_TAIL_LINES, StopSignals

DEPLOYMENT_ENV = "PDLAUNCH_SLURM_DEPLOYMENT"  # the validated DeploymentConfig as JSON, for slurm_node
STOP_SIGNAL = signal.SIGUSR1  # srun forwards it to the step's task (slurm_node turns it into a stop)
STEP_STOP_TIMEOUT_S = 60.0  # each node drains in-flight requests (the default drain) and stops its processes
STEP_KILL_TIMEOUT_S = 10.0  # srun, on SIGTERM, kills its step and exits; SIGKILL after this
HEALTH_TIMEOUT_S = 2.0
# srun reads these from its environment as if given on its command line. SLURM_LABELIO (`--label`, which users
# export for their own jobs) would put "0: " before every line the step prints, lines slurm_lines.py reads;
# SLURM_STDOUTMODE / SLURM_STDERRMODE / SLURM_STDINMODE (`-o` / `-e` / `-i`) would send the step's output to a file
# of their own instead of LOG_DIR/slurm-nodeK.log (or feed it another input).
# GPU_REQUEST_ENV (slurm_gres.py): the job's GPU options, which srun would apply to each one-node, one-task step
# (a --gpus=16 job's step asking 16 GPUs of one node); each step asks for its node's GPUs itself.
SRUN_UNSET_ENV = ("SLURM_LABELIO", "SLURM_STDOUTMODE", "SLURM_STDERRMODE", "SLURM_STDINMODE", *GPU_REQUEST_ENV)
END_LINES = 50  # the last lines of each step's output searched for why SLURM ended it

# slurmstepd, when SLURM ends a step: "slurmstepd-pdn1: error: *** STEP 7.1 ON pdn2 CANCELLED AT
# 2026-11-28T11:16:47 DUE TO NODE FAILURE, SEE SLURMCTLD LOG FOR DETAILS ***" (no "DUE TO": a scancel)
_CANCELLED = re.compile(r"\*\*\* (?:JOB|STEP) (\S+) ON (\S+) CANCELLED AT \S+(?: DUE TO ([A-Za-z][A-Za-z ]*))?")
_NODE_FAILURE = re.compile(r"srun: error: Node failure on (\S+)")  # srun, when a node of its step fails


@dataclass(frozen=True)
class SlurmEnd:
    """Why SLURM ended steps of the job, as their output says; `failure`: not a plain cancellation."""

    reason: str
    failure: bool


def slurm_end(steps: list[ChildProcess]) -> SlurmEnd | None:
    """What slurmstepd and srun wrote in the steps' output when SLURM ended them, or None (they did not)."""
    failed_nodes: list[str] = []
    cancelled: list[str] = []
    failure = False
    for step in steps:
        try:
            lines = step.tail(END_LINES)
        except LogUnreadable:  # a hung file system: the failure's report names the log (`failed`)
            continue
        for line in lines:
            if (node := _NODE_FAILURE.search(line)) and node.group(1) not in failed_nodes:
                failed_nodes.append(node.group(1))
            if match := _CANCELLED.search(line):
                step_id, host, due = match.groups()
                why = f" due to {due.strip().lower()}" if due else " (scancel)"
                failure = failure or due is not None
                text = f"SLURM cancelled {'step' if '.' in step_id else 'job'} {step_id} on {host}{why}"
                if text not in cancelled:
                    cancelled.append(text)
    if not failed_nodes and not cancelled:
        return None
    parts = ([f"node failure on {', '.join(failed_nodes)}"] if failed_nodes else []) + cancelled
    return SlurmEnd("; ".join(parts), failure or bool(failed_nodes))


def srun_argv(node: int, cpus: int | None, gres: NodeGres | None = None) -> list[str]:
    """Node `node`'s step, with every CPU, all memory and every GPU (and other GRES) the job has there (`cpus`: a
    step gets one CPU by default; `gres`: slurm_gres.py, None where SLURM did not say) and no CPU binding: its
    launcher divides them among its instances. --overlap lets the steps share the allocation with the batch step;
    --relative picks the node. --export=ALL: the step needs this process's environment (the deployment,
    DEPLOYMENT_ENV; PATH and the rest), and `sbatch --export=NONE` leaves SLURM_EXPORT_ENV=NONE, which srun would
    otherwise obey."""
    return ["srun", "--nodes=1", "--ntasks=1", f"--relative={node}", "--overlap", "--export=ALL",
            f"--job-name={step_name(node)}",
            *([f"--cpus-per-task={cpus}"] if cpus else []), "--cpu-bind=none", "--mem=0", *gres_option(gres),
            sys.executable, "-m", "pdlaunch.launcher.backends.slurm_node", "--node-rank", str(node)]


def step_gpus(console: Console, job: str, nodes: int) -> list[NodeGres]:
    """The GRES the job has on each of its `nodes` nodes (slurm_gres.py), for each step to ask for; SLURM's
    default for each, with a warning, where SLURM does not say (the steps then take SLURM's default: the GPUs the
    job asked for, none of those an exclusive job has implicitly)."""
    try:
        gpus = job_gres_per_node(job, node_names())
        why = "it lists no GRES per node"
    except SlurmCallError as exc:
        gpus, why = None, str(exc)
    if gpus is not None and len(gpus) == nodes:
        return gpus
    console.print(f"[yellow]warning:[/yellow] could not read job {job}'s GPUs per node from `scontrol show job -d "
                  f"{job}` ({escape(why)}): each srun step gets SLURM's default GPUs, which under `sbatch "
                  "--exclusive` alone are none; ask for them with sbatch/salloc --gres=gpu:N if a node's step "
                  "sees too few", highlight=False, soft_wrap=True)
    return [NodeGres(None)] * nodes


def cpus_per_node(value: str | None, nodes: int) -> list[int | None]:
    """SLURM_JOB_CPUS_PER_NODE ("72(x2),36": 72 on each of the first two nodes, then 36) per node."""
    counts: list[int | None] = []
    for item in filter(None, (value or "").split(",")):
        count, _, repeat = item.partition("(x")
        if not count.isdigit() or (repeat and not repeat.rstrip(")").isdigit()):
            return [None] * nodes
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return (counts + [None] * nodes)[:nodes]


def proxy_url(cfg: DeploymentConfig) -> str:
    host = cfg.proxy.host
    if host in ("0.0.0.0", "::", ""):
        host = cfg.parallel.nodes[0].address if cfg.parallel.nodes else "127.0.0.1"
    return f"http://{host_port(host, cfg.proxy.port)}"


def _proxy_ready(url: str) -> bool:
    try:
        # trust_env=False: a cluster's http_proxy (set for downloads) cannot reach node 0's proxy
        return httpx.get(f"{url}/health", timeout=HEALTH_TIMEOUT_S, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _dead(steps: list[ChildProcess]) -> ChildProcess | None:
    return next((step for step in steps if step.poll() is not None), None)


def failed(console: Console, cfg: DeploymentConfig, steps: list[ChildProcess], devices: NodeDevices, job: str,
           when: str = "") -> bool:
    """Whether the deployment failed, saying why: a node serving on another device than node 0 (checked first:
    a step that then fails on the mismatch would hide it), or a step that ended."""
    disagreement = devices.disagreement()
    if disagreement is not None:
        node, error = disagreement
        console.print(f"[red]error:[/red] node {node}: {escape(error.render())}; stopping the deployment",
                      highlight=False, soft_wrap=True)
        return True
    dead = _dead(steps)
    if dead is None:
        return False
    node = steps.index(dead)
    try:
        lines = dead.tail(END_LINES)
    except LogUnreadable as exc:  # a hung file system: said, and the stop goes on
        lines, unread = [], str(exc)
    else:
        unread = ""
    said = node_error(lines, node)
    if said is None:
        console.print(f"[red]error:[/red] {escape(step_exit(cfg, dead, steps, job, when))}; stopping the deployment",
                      highlight=False, soft_wrap=True)
        show_lines(console, dead.log_path, failure_lines(lines, LOG_TAIL_LINES))
        if unread:
            console.print(f"node {node}'s step: {unread}", highlight=False, markup=False, soft_wrap=True)
        return True
    # The step's own reason (a check of its node failed) is the error; its output has nothing more to show.
    console.print(f"[red]error:[/red] {escape(said)}", highlight=False, soft_wrap=True)
    console.print(f"{escape(step_exit(cfg, dead, steps, job, when))}; stopping the deployment (its output: "
                  f"{escape(str(dead.log_path))})", highlight=False, soft_wrap=True)
    return True


def run_slurm(cfg: DeploymentConfig) -> int:
    """Serve `cfg` (nodes already taken from the allocation) until a signal; 0 after a clean stop."""
    # LossyOutput: a status line that cannot be written (a full disk, a closed pipe) is lost, not the deployment
    console = Console(file=LossyOutput(sys.stdout).as_text_io())
    # Before any step binds a port: one something else listens at is named here, not in that node's step log.
    # The ports are the ones each step plans, whatever GPUs this process's machine has (a login node's none).
    for field, message in check_node_ports(cfg):
        console.print(f"[yellow]warning:[/yellow] {escape(field)}: {escape(message)}", highlight=False, soft_wrap=True)
    log_dir = Path(cfg.log_dir)
    env = {DEPLOYMENT_ENV: cfg.model_dump_json()}
    cpus = cpus_per_node(os.environ.get("SLURM_JOB_CPUS_PER_NODE"), len(cfg.parallel.nodes))
    job = os.environ.get("SLURM_JOB_ID", "?")
    gpus = step_gpus(console, job, len(cfg.parallel.nodes))
    # A launcher that dies (OOM killer, kill -9) leaves its srun clients running, and under salloc the
    # allocation lives on: the kernel sends each srun STOP_SIGNAL then, so the nodes drain and stop as on
    # Ctrl-C. This thread starts the steps and waits for them to end, as parent_death_signal requires.
    steps = [ChildProcess(f"node {k}", srun_argv(k, cpus[k], gpus[k]), log_dir / f"slurm-node{k}.log", env=env,
                          parent_death_signal=STOP_SIGNAL, unset_env=SRUN_UNSET_ENV)
             for k in range(len(cfg.parallel.nodes))]
    url = proxy_url(cfg)
    # This process writes LOG_DIR/slurm-nodeK.log: a second deployment in a live one's directory (a second job
    # with the default `logs`) is refused here, before it truncates those logs or starts a step (LogDirInUse).
    lock = LogDirLock(log_dir)
    lock.acquire(url)
    nodes = ", ".join(node.address for node in cfg.parallel.nodes)
    gpu_text = (f" (GPUs of each: {', '.join('SLURM default' if g.gpus is None else str(g.gpus) for g in gpus)})"
                if any(g.gpus for g in gpus) else "")
    devices = NodeDevices(cfg, [step.log_path for step in steps])
    with StopSignals() as signals:
        signals.on_second = lambda: console.print("second signal: stopping now", highlight=False)

        def hurry() -> bool:  # a second signal: end the steps without waiting for the nodes' drain
            return signals.forced

        stop_wait_s = step_stop_timeout_s(cfg)

        def supervise() -> int:
            for step in steps:
                step.start()
            console.print(f"slurm: {len(steps)} srun steps on {nodes}{gpu_text}; waiting for the proxy at {url} "
                          f"(steps' output in {log_dir}/slurm-node*.log)", highlight=False, soft_wrap=True)
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not _proxy_ready(url):
                if signals.requested.wait(POLL_S):
                    console.print(f"{signals.signal_name} received while starting; stopping "
                                  "(Ctrl-C again to stop at once)")
                    return stopped_by_signal(console, steps, job, hurry)
                if failed(console, cfg, steps, devices, job, " while starting"):
                    return 1
                if time.monotonic() > deadline:
                    raise PdlaunchError(f"the proxy at {url} did not answer /health within {READY_TIMEOUT_S:.0f}s",
                                        hint=f"see the steps' output in {log_dir}/slurm-node*.log")
            console.print(f"[green]ready[/green]: OpenAI API at [bold]{url}/v1[/bold] (nodes {nodes}); "
                          f"{how_to_stop(job)} to stop", soft_wrap=True)
            while not signals.requested.wait(POLL_S):
                if failed(console, cfg, steps, devices, job):
                    return 1
            console.print(f"{signals.signal_name} received: stopping every node (up to "
                          f"{stop_wait_s:.0f}s); Ctrl-C again to stop at once", highlight=False)
            return stopped_by_signal(console, steps, job, hurry, stop_wait_s)

        left: list[str] = []
        try:
            code = supervise()
        finally:
            # After a failure (a step ended, the proxy never answered) nobody asked for a drain: a first
            # Ctrl-C ends the other steps at once. After a stop signal they have ended already.
            if any(step.running for step in steps):
                console.print(f"stopping the other nodes (up to {stop_wait_s:.0f}s); Ctrl-C to stop at "
                              "once", highlight=False)
            stop_steps(steps, signals.requested.is_set, stop_wait_s)
            cancelled, left = cancel_left_steps(console, steps, job)
            if left:
                console.print(f"[red]stopped, but job {job} may still run {', '.join(left)}[/red] (see above)",
                              highlight=False, soft_wrap=True)
            else:
                console.print("stopped: every srun step ended"
                              + (f" (cancelled through SLURM: {', '.join(cancelled)})" if cancelled else ""),
                              highlight=False, soft_wrap=True)
            lock.release()  # last: the directory is this deployment's until every step has ended
        return 1 if left else code


def how_to_stop(job: str) -> str:
    """The stop a user has: in a batch script (sbatch sets ENVIRONMENT=BATCH) a TERM to the batch step reaches
    this process; under salloc there is no batch step, and Ctrl-C (or a TERM to this process) stops it."""
    if os.environ.get("ENVIRONMENT") == "BATCH":
        return f"scancel --signal=TERM --batch {job}, or Ctrl-C,"
    return f"Ctrl-C (or kill -TERM {os.getpid()})"


def step_exit(cfg: DeploymentConfig, dead: ChildProcess, steps: list[ChildProcess], job: str, when: str = "") -> str:
    """How a step ended, with its node's address, the job, and SLURM's reason when the output gives one."""
    node = steps.index(dead)
    end = slurm_end(steps)
    return (f"{dead.name}'s srun step (on {cfg.parallel.nodes[node].address}, job {job}) {dead.describe_exit()}{when}"
            + (f": {end.reason}" if end is not None else ""))


def step_stop_timeout_s(cfg: DeploymentConfig) -> float:
    """How long the nodes get to stop: STEP_STOP_TIMEOUT_S, longer by as much as the config's drain
    (supervision.drain_timeout_seconds) passes the default one."""
    return STEP_STOP_TIMEOUT_S + max(0.0, cfg.supervision.drain_timeout_seconds - DRAIN_TIMEOUT_S)


def stopped_by_signal(console: Console, steps: list[ChildProcess], job: str, hurry: Callable[[], bool],
                      wait_s: float | None = None) -> int:
    """Stop every step after a stop signal (at once when `hurry()` turns true), waiting up to `wait_s` (None:
    STEP_STOP_TIMEOUT_S); 1 if SLURM sent it because the job failed (a node failure, the time limit,
    preemption), saying so, else 0."""
    end = stop_steps(steps, hurry, wait_s)
    if end is None:
        return 0
    if not end.failure:
        console.print(f"job {job}: {end.reason}", highlight=False, soft_wrap=True)
        return 0
    console.print(f"[red]error:[/red] SLURM ended job {job}: {escape(end.reason)}; the steps' output is in "
                  f"{escape(str(steps[0].log_path.parent))}/slurm-node*.log", highlight=False, soft_wrap=True)
    return 1


def stop_steps(steps: list[ChildProcess], hurry: Callable[[], bool] | None = None,
               wait_s: float | None = None) -> SlurmEnd | None:
    """Ask every node to stop (SIGUSR1, which srun forwards to its task: SIGTERM would make srun kill
    the step at once), wait up to `wait_s` (None: STEP_STOP_TIMEOUT_S) for all, or until `hurry()` turns true (a second
    Ctrl-C), then end what is left: SIGTERM, SIGKILL after STEP_KILL_TIMEOUT_S (the steps of srun clients
    killed so are cancel_left_steps's). Returns why SLURM ended steps as their output said before that
    SIGTERM: slurmstepd writes the same line as for a scancel when srun kills its step at this process's
    request."""
    for step in steps:
        if step.running:
            step.signal_group(STOP_SIGNAL)
    deadline = time.monotonic() + (STEP_STOP_TIMEOUT_S if wait_s is None else wait_s)
    for step in steps:
        if not step.wait(deadline - time.monotonic(), hurry) and hurry is not None and hurry():
            break
    end = slurm_end(steps)
    stop_all(steps, STEP_KILL_TIMEOUT_S)
    return end
