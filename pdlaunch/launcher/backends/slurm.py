"""`--backend slurm`: one `srun` step per node of the allocation, each running that node's launcher.

Inside `sbatch`/`salloc`, config/backend.py has made the allocation's nodes `parallel.nodes`. This
process (the batch script's, or the salloc shell's) starts one step per node,
`srun --nodes=1 --ntasks=1 --relative=K --overlap python -m pdlaunch.launcher.backends.slurm_node --node-rank K`,
which is the multi-node path of `pdlaunch serve --node-rank K` on node K: its instances, its ranks of
TP groups spanning nodes (rendezvous through torch.distributed with the store on the group's first
node), and on node 0 the proxy. The validated config, with one deployment secret for every node,
reaches the steps through their environment (srun passes it on), not a shared file.

It waits for the proxy to answer /health, then supervises the steps: each node's launcher restarts
its own instances; a step that ends stops the deployment (exit 1, naming the node and its log).
SIGINT/SIGTERM (`scancel --signal=TERM --batch`, Ctrl-C under salloc) stop it: it sends each srun
SIGUSR1, which srun forwards to its node's launcher, each node drains and stops its processes, and
this process exits 0 once every step has ended.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console

from pdlaunch.config.models import DeploymentConfig
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.deployment import POLL_S, READY_TIMEOUT_S
from pdlaunch.launcher.process import ChildProcess, stop_all
from pdlaunch.launcher.serve import StopSignals, report_failure

DEPLOYMENT_ENV = "PDLAUNCH_SLURM_DEPLOYMENT"  # the validated DeploymentConfig as JSON, for slurm_node
STOP_SIGNAL = signal.SIGUSR1  # srun forwards it to the step's task (slurm_node turns it into a stop)
STEP_STOP_TIMEOUT_S = 60.0  # each node drains in-flight requests and stops its processes
HEALTH_TIMEOUT_S = 2.0


def srun_argv(node: int, cpus: int | None) -> list[str]:
    """Node `node`'s step, with every CPU and all memory the job has there (`cpus`; a step gets one CPU
    by default) and no CPU binding: its launcher divides them among its instances. --overlap lets the
    steps share the allocation (each keeps access to its node's GPUs); --relative picks the node."""
    return ["srun", "--nodes=1", "--ntasks=1", f"--relative={node}", "--overlap", f"--job-name=pdlaunch-node{node}",
            *([f"--cpus-per-task={cpus}"] if cpus else []), "--cpu-bind=none", "--mem=0",
            sys.executable, "-m", "pdlaunch.launcher.backends.slurm_node", "--node-rank", str(node)]


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
    return f"http://{f'[{host}]' if ':' in host else host}:{cfg.proxy.port}"


def _proxy_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=HEALTH_TIMEOUT_S).status_code == 200
    except httpx.HTTPError:
        return False


def _dead(steps: list[ChildProcess]) -> ChildProcess | None:
    return next((step for step in steps if step.poll() is not None), None)


def run_slurm(cfg: DeploymentConfig) -> int:
    """Serve `cfg` (nodes already taken from the allocation) until a signal; 0 after a clean stop."""
    console = Console()
    log_dir = Path(cfg.log_dir)
    env = {DEPLOYMENT_ENV: cfg.model_dump_json()}
    cpus = cpus_per_node(os.environ.get("SLURM_JOB_CPUS_PER_NODE"), len(cfg.parallel.nodes))
    steps = [ChildProcess(f"node {k}", srun_argv(k, cpus[k]), log_dir / f"slurm-node{k}.log", env=env)
             for k in range(len(cfg.parallel.nodes))]
    url = proxy_url(cfg)
    nodes = ", ".join(node.address for node in cfg.parallel.nodes)
    with StopSignals() as signals:
        try:
            for step in steps:
                step.start()
            console.print(f"slurm: {len(steps)} srun steps on {nodes}; waiting for the proxy at {url} "
                          f"(steps' output in {log_dir}/slurm-node*.log)", highlight=False, soft_wrap=True)
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not _proxy_ready(url):
                if signals.requested.wait(POLL_S):
                    console.print(f"{signals.signal_name} received while starting; stopping")
                    return 0
                dead = _dead(steps)
                if dead is not None:
                    report_failure(console, f"{dead.name}'s srun step {dead.describe_exit()} while starting", dead)
                    return 1
                if time.monotonic() > deadline:
                    raise PdlaunchError(f"the proxy at {url} did not answer /health within {READY_TIMEOUT_S:.0f}s",
                                        hint=f"see the steps' output in {log_dir}/slurm-node*.log")
            console.print(f"[green]ready[/green]: OpenAI API at [bold]{url}/v1[/bold] (nodes {nodes}); "
                          "scancel --signal=TERM --batch JOBID, or Ctrl-C, to stop", soft_wrap=True)
            while not signals.requested.wait(POLL_S):
                dead = _dead(steps)
                if dead is not None:
                    report_failure(console, f"{dead.name}'s srun step {dead.describe_exit()}", dead)
                    return 1
            console.print(f"{signals.signal_name} received: stopping every node (up to "
                          f"{STEP_STOP_TIMEOUT_S:.0f}s)", highlight=False)
            return 0
        finally:
            stop_steps(steps)
            console.print("stopped: every srun step ended", highlight=False)


def stop_steps(steps: list[ChildProcess]) -> None:
    """Ask every node to stop (SIGUSR1, which srun forwards to its task: SIGTERM would make srun kill
    the step at once), wait up to STEP_STOP_TIMEOUT_S for all, then end what is left (SIGTERM, SIGKILL)."""
    for step in steps:
        if step.running:
            step.signal_group(STOP_SIGNAL)
    deadline = time.monotonic() + STEP_STOP_TIMEOUT_S
    for step in steps:
        step.wait(deadline - time.monotonic())
    stop_all(steps, 10.0)
