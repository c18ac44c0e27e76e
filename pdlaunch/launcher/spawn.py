"""What one node starts of a deployment, from its plan: every instance whose rank 0 runs here, and every rank it
runs for an instance whose rank 0 is on another node; each with its log file, its environment and its status row.

Apart from Deployment, which waits for these processes, restarts and stops them, because this is where how each
starts is decided, once: its command line (child_commands.py), the CPU threads this node's processes share, the
prefill side channels a decode may reach, and a remote rank's death with this launcher.
"""

from __future__ import annotations

import signal
from pathlib import Path

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.child_commands import cpu_threads, instance_argv, prefill_side_channels_env, rank_argv
from pdlaunch.launcher.plan import DeploymentPlan
from pdlaunch.launcher.process import ChildProcess
from pdlaunch.launcher.status import StatusRow


def spawn_children(cfg: DeploymentConfig, plan: DeploymentPlan, deployment_file: Path, log_dir: Path,
                   rows: dict[str, StatusRow], instances: list[ChildProcess], ranks: list[ChildProcess]) -> None:
    """Start this node's instances (into `instances`) and remote ranks (into `ranks`), with a row for each and for
    every instance another node runs ("remote")."""
    device = plan.instances[0].spec.device
    threads = cpu_threads(len(plan.local) + len(plan.remote_ranks)) if device == "cpu" else {}
    prefills = prefill_side_channels_env(cfg, plan)
    for instance in plan.instances:
        spec = instance.spec
        devices = _cuda_label(instance.physical_devices, instance.env) if spec.device == "cuda" else spec.device
        rows[spec.name] = StatusRow(spec.name, spec.role, devices, instance.url,
                                    state="starting" if instance.local else "remote")
        if instance.local:
            child = ChildProcess(spec.name, instance_argv(deployment_file, instance),
                                 log_dir / f"{spec.name}.log",
                                 env={**threads, **instance.env, **(prefills if spec.role == "decode" else {})})
            instances.append(child)  # known before it runs: stop() then reaches it whenever it comes
            child.start()
    for rank in plan.remote_ranks:
        where = f"node {rank.placement.nodes[0]}"
        devices = _cuda_label([rank.physical_device], rank.env) if rank.physical_device is not None else \
            rank.spec.device
        rows[rank.name] = StatusRow(rank.name, f"rank {rank.rank}", devices, f"rank 0 on {where}", state="running")
        # No --parent-pid watch, and no SIGTERM while it waits for rank 0's store: it dies with this launcher.
        child = ChildProcess(rank.name, rank_argv(deployment_file, rank), log_dir / f"{rank.name}.log",
                             env={**threads, **rank.env}, parent_death_signal=signal.SIGKILL)
        ranks.append(child)
        child.start()


def _cuda_label(indices: list[int], env: dict[str, str]) -> str:
    """The status table's GPUs of a process: the host's GPU numbers its CUDA_VISIBLE_DEVICES names (under a
    launcher with a list of its own, `CUDA_VISIBLE_DEVICES=2,3 pdlaunch serve`, the launcher's device 0 is GPU 2,
    as nvidia-smi numbers it); the launcher's own numbering where that list names GPUs by UUID or MIG name."""
    names = env.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if len(names) == len(indices) and all(n.strip().isdigit() for n in names):
        return "cuda:" + ",".join(n.strip() for n in names)
    return "cuda:" + ",".join(map(str, indices))

