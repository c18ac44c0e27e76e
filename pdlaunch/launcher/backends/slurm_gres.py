"""The GPUs each `--backend slurm` step asks SLURM for: every GPU the job has on the step's node.

A step that asks no GRES gets "all of the generic resources that have been requested by the job, except those
implicitly requested when a job is exclusive" (`man srun`, --gres; the same from 19.05 to 26.05), and srun reads
the job's GPU options back from the batch environment as if given to the step (`man srun`, INPUT ENVIRONMENT
VARIABLES; sbatch/salloc set them, `man sbatch`, OUTPUT ENVIRONMENT VARIABLES). So, as seen on SLURM 22.05, a
one-task step on one node left to the defaults gets:
- under `sbatch --exclusive` without a GPU request: no GPU (the node's GPUs are the job's, implicitly);
- under `--gpus-per-task=1 --ntasks-per-node=8`: one GPU (SLURM_GPUS_PER_TASK=1, and the step has one task);
- under `--gpus=16` on two nodes: no step at all ("Invalid generic resource (gres) specification": SLURM_GPUS=16
  asked of one node).
Each step therefore runs without those variables (GPU_REQUEST_ENV) and asks `--gres=gpu:N` with N the GPUs the job
has on its node, as `scontrol show job -d` lists them per node (`Nodes=gpu[1-2] ... GRES=gpu:8(IDX:0-7)`; exclusive
jobs included), or `--gres=none` on a node where the job has none (a step asking GPUs of a job without GRES is
refused). `--overlap` (SLURM >= 22.05: CPUs, memory and GRES) lets the steps share them with the batch step.
"""

from __future__ import annotations

import os
import re

from pdlaunch.launcher.backends.slurm_steps import slurm_call

# srun reads these as the step's own GPU request (or a request derived from GPUs): sbatch/salloc set them from the
# job's options (SLURM_GPUS for --gpus, ...; SLURM_TRES_PER_TASK also carries --gpus-per-task since 23.02), and
# users export SLURM_GRES / SLURM_STEP_GRES themselves. The step asks for its node's GPUs itself (gres_option),
# its CPUs with --cpus-per-task and its memory with --mem=0, so none of them may reach its srun.
GPU_REQUEST_ENV = ("SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_SOCKET", "SLURM_GPUS_PER_TASK",
                   "SLURM_TRES_PER_TASK", "SLURM_GRES", "SLURM_STEP_GRES", "SLURM_CPUS_PER_GPU", "SLURM_MEM_PER_GPU",
                   "SLURM_NTASKS_PER_GPU")

_ITEMS = re.compile(r",(?![^(]*\))")  # the commas between GRES entries, not those in "(IDX:0-1,3)"


def gres_gpus(value: str) -> int | None:
    """The GPUs in one node's GRES of `scontrol show job -d` ("gpu:2(IDX:0-1)", "gpu:a100:2(IDX:0,2),nic:1",
    "gpu(IDX:0-1)" before 20.11, "" or "(null)": 0): the count, else the indices listed. None for GRES without a
    gpu entry ("shard:2(...)", "mps:100"): those carry GPUs too, and the step keeps SLURM's default, all of them."""
    count, others = 0, False
    for item in filter(None, _ITEMS.split("" if value == "(null)" else value)):
        name, _, indices = item.partition("(IDX:")
        parts = name.split(":")
        if parts[0] != "gpu":
            others = True
            continue
        if len(parts) > 1 and parts[-1].isdigit():
            count += int(parts[-1])
        else:
            count += sum(int(b) - int(a) + 1 if b else 1 for a, _, b in
                         (part.partition("-") for part in indices.rstrip(")").split(",") if part[:1].isdigit()))
    return None if others and not count else count


def gpus_by_node_list(details: str) -> list[tuple[str, int | None]]:
    """(host list, GPUs the job has on each of those nodes: gres_gpus) for each `Nodes=... GRES=...` of
    `scontrol show job -d --oneliner`; [] where it lists no node details."""
    found: list[tuple[str, int | None]] = []
    nodes: str | None = None
    for word in details.split():
        key, _, value = word.partition("=")
        if key == "Nodes":
            if nodes is not None:  # no GRES named for the previous nodes: none there
                found.append((nodes, 0))
            nodes = value
        elif key in ("GRES", "GRES_IDX") and nodes is not None:
            found.append((nodes, gres_gpus(value)))
            nodes = None
    if nodes is not None:
        found.append((nodes, 0))
    return found


def job_gpus_per_node(job: str, names: list[str]) -> list[int | None] | None:
    """The GPUs job `job` has on each of its nodes `names` (SLURM's order; None for a node whose GPUs are shards
    or MPS: gres_gpus), or None where `scontrol show job -d` does not say (no node details: the steps then take
    SLURM's default). Raises SlurmCallError."""
    by_name: dict[str, int | None] = {}
    for host_list, gpus in gpus_by_node_list(slurm_call("scontrol", "show", "job", "-d", "--oneliner", job)):
        for name in slurm_call("scontrol", "show", "hostnames", host_list).split():
            by_name[name] = gpus
    if not by_name or any(name not in by_name for name in names):
        return None
    return [by_name[name] for name in names]


def gres_option(gpus: int | None) -> list[str]:
    """The step's GRES request: its node's `gpus`, `--gres=none` for none, nothing when unknown (SLURM's default)."""
    if gpus is None:
        return []
    return [f"--gres=gpu:{gpus}" if gpus else "--gres=none"]


def node_names() -> list[str]:
    """The job's nodes in SLURM's order (config/backend.py made them parallel.nodes, in this order). Raises
    SlurmCallError."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
    return slurm_call("scontrol", "show", "hostnames", nodelist).split() if nodelist else []

