"""A `--backend slurm` node's step that sees fewer GPUs than the ranks placed on its node need (slurm_node.py): one
problem in SLURM's terms (the node, what the step sees and what SLURM gave it, what the node needs, the sbatch
option that gives it), in place of the GPU count problems validation reports for it on "this machine".

What a node needs is what config/rules/resources.device_problems checks: the fewest visible GPUs for which its
problems are only those it has with GPUs to spare (listed devices that exist, the ranks placed there, spanning
groups included; the count of those problems only falls as GPUs are added).
"""

from __future__ import annotations

from collections.abc import Mapping

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.rules import resources, roles
from pdlaunch.config.validate import device_rules, group_tp

WHERE = "this machine"  # how validate_deployment names a node's own GPUs


def _with_tp(cfg: DeploymentConfig) -> DeploymentConfig:
    out = cfg.model_copy(deep=True)
    for group in out.instances:
        group.tp = group_tp(cfg, group)
    return out


def gpus_needed(cfg: DeploymentConfig, node: int) -> int:
    """The fewest GPUs node `node` must see for the deployment's ranks there (0: none placed there)."""
    tp_cfg = _with_tp(cfg)

    def found(gpus: int) -> int:
        return len(resources.device_problems(tp_cfg, gpus, WHERE, [node]))

    least, low, high = found(roles.MAX_RANKS), 0, roles.MAX_RANKS
    while low < high:
        middle = (low + high) // 2
        if found(middle) <= least:
            high = middle
        else:
            low = middle + 1
    return low


def _given(env: Mapping[str, str]) -> str:
    return ", ".join(f"{name}={env[name]}" if name in env else f"{name} unset"
                     for name in ("SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES"))


def gpu_shortage(cfg: DeploymentConfig, node: int, seen: int,
                 env: Mapping[str, str]) -> tuple[Problem, list[Problem]] | None:
    """Node `node`'s step sees `seen` CUDA devices, fewer than its ranks need: the problem to report, and the
    problems of validate_deployment it explains (to leave out); None when it sees enough. `cfg`: this node's (its
    launcher.backend local, parallel.node_rank `node`); `env`: the step's environment, which SLURM set."""
    need = gpus_needed(cfg, node)
    if seen >= need:
        return None
    tp_cfg = _with_tp(cfg)
    enough = resources.device_problems(tp_cfg, need, WHERE, [node])
    explained = [p for p in resources.device_problems(tp_cfg, seen, WHERE, [node]) if p not in enough]
    if seen == 0:
        explained += device_rules(cfg, "cuda", None)  # "cuda requested but no CUDA device is visible"
    address = cfg.parallel.nodes[node].address
    what = (f"node {node} ({address}) needs {need} GPU(s) for the ranks the deployment places there, but its srun "
            f"step sees {seen} ({_given(env)})")
    granted = env.get("SLURM_GPUS_ON_NODE", "")
    if granted.isdigit() and int(granted) > seen:
        hint = (f"SLURM gave the step {granted} GPU(s) but CUDA sees {seen} of them: check that node's driver "
                f"(`srun --overlap --nodes=1 --relative={node} nvidia-smi` lists what a step there sees)")
    else:
        hint = (f"allocate the GPUs with the job: sbatch/salloc --gres=gpu:{need} (or --gpus-per-node={need}), "
                "which every node gets; each step asks SLURM for all the GPUs the job has on its node (`scontrol "
                "show job -d $SLURM_JOB_ID` lists them); or lower --prefill/--decode or TP there")
    return problem(f"parallel.nodes[{node}]", what, hint), explained
