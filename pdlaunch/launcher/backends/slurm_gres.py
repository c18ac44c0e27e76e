"""The GRES each `--backend slurm` step asks SLURM for: every GPU (and other GRES) the job has on the step's node.

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
A step that names any GRES gets those alone: slurmctld copies the job's GRES request to a step only when the step
asks none (step_mgr.c, _copy_job_tres_to_step). So the step's --gres also names the job's other GRES on its node
(`--gres=gpu:8,nvme:1` for `GRES=gpu:8(IDX:0-7),nvme:1(IDX:0)`; a count-only GRES, without device files, reads
`bw(CNT:4)` there), and any the job asked for per node that no node's details list, as it asked for them
(`TresPerNode=gres:bw:4G`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from pdlaunch.launcher.backends.slurm_steps import slurm_call

# srun reads these as the step's own GPU request (or a request derived from GPUs): sbatch/salloc set them from the
# job's options (SLURM_GPUS for --gpus, ...; SLURM_TRES_PER_TASK also carries --gpus-per-task since 23.02), and
# users export SLURM_GRES / SLURM_STEP_GRES themselves. The step asks for its node's GPUs itself (gres_option),
# its CPUs with --cpus-per-task and its memory with --mem=0, so none of them may reach its srun.
GPU_REQUEST_ENV = ("SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_SOCKET", "SLURM_GPUS_PER_TASK",
                   "SLURM_TRES_PER_TASK", "SLURM_GRES", "SLURM_STEP_GRES", "SLURM_CPUS_PER_GPU", "SLURM_MEM_PER_GPU",
                   "SLURM_NTASKS_PER_GPU")

_ITEMS = re.compile(r",(?![^(]*\))")  # the commas between GRES entries, not those in "(IDX:0-1,3)"
SHARED_GPU_GRES = ("shard", "mps")  # GRES that are shares of GPUs


@dataclass(frozen=True)
class NodeGres:
    """The GRES a job has on one node, for its step there to ask for: `gpus` (None: no gpu entry but GPU shards
    or MPS, which the step leaves to SLURM's default) and the node's other GRES as `--gres` entries ("nvme:1",
    "nic:mlx:1")."""

    gpus: int | None
    others: tuple[str, ...] = ()


SLURM_DEFAULT = NodeGres(None)  # a step that asks no GRES: SLURM gives it what the job asked for


def gres_entries(value: str) -> list[tuple[str, str]]:
    """(name[:type], count) of each entry of one node's GRES in `scontrol show job -d`: "gpu:a100:2(IDX:0,2)",
    "nvme:1(IDX:0)", "bw(CNT:4)" (no device files), "shard:2(gpu:0:1,...)" (23.11+), "gpu(IDX:0-1,3)" (before
    20.11: the indices only), "" or "(null)": none. The count as SLURM printed it (TresPerNode's may be "4G")."""
    found: list[tuple[str, str]] = []
    for item in filter(None, _ITEMS.split("" if value == "(null)" else value)):
        head, _, inner = item.partition("(")
        inner = inner.rstrip(")")
        name, _, count = head.rpartition(":")
        if inner.startswith("CNT:"):
            found.append((head, inner[4:]))
        elif name and count[:1].isdigit():
            found.append((name, count))
        elif inner.startswith("IDX:"):
            found.append((head, str(sum(int(b) - int(a) + 1 if b else 1 for a, _, b in
                                        (part.partition("-") for part in inner[4:].split(",") if part[:1].isdigit())))))
        else:
            found.append((head, "1"))  # "name" alone: srun's count defaults to 1
    return found


def _base(name: str) -> str:
    return name.partition(":")[0]


def node_gres(value: str, job_only: tuple[str, ...] = ()) -> NodeGres:
    """A node's GRES (gres_entries) as its step asks for them: the GPUs counted, the rest kept, for a step that
    names GRES gets those alone (srun --gres replaces the job's whole GRES request for the step), with
    `job_only`: the job's GRES that no node's details list, as `--gres` entries."""
    gpus, others, shared = 0, [], False
    for name, count in gres_entries(value):
        if _base(name) == "gpu":
            gpus += int(count)
        elif count not in ("0", ""):
            others.append(f"{name}:{count}")
            shared = shared or _base(name) in SHARED_GPU_GRES
    if shared and not gpus:
        return SLURM_DEFAULT
    return NodeGres(gpus, (*others, *job_only))


def gres_gpus(value: str) -> int | None:
    """The GPUs in one node's GRES of `scontrol show job -d` ("gpu:2(IDX:0-1)", "gpu:a100:2(IDX:0,2),nic:1",
    "gpu(IDX:0-1)" before 20.11, "" or "(null)": 0). None for GPU shards or MPS without a gpu entry ("shard:2(...)",
    "mps:100"): those carry GPUs too, and the step keeps SLURM's default, all of them."""
    return node_gres(value).gpus


def gpus_by_node_list(details: str) -> list[tuple[str, int | None]]:
    """(host list, GPUs the job has on each of those nodes: gres_gpus) for each `Nodes=... GRES=...` of
    `scontrol show job -d --oneliner`; [] where it lists no node details."""
    return [(nodes, gres.gpus) for nodes, gres in gres_by_node_list(details)]


def gres_by_node_list(details: str) -> list[tuple[str, NodeGres]]:
    """(host list, the GRES the job has on each of those nodes: node_gres) for each `Nodes=... GRES=...` of
    `scontrol show job -d --oneliner`; [] where it lists no node details. The job's per-node request
    (TresPerNode=gres:nvme:1, or gres/nvme:1 since 23.02) names any GRES the node details leave out, which
    every node of the job has."""
    listed: list[tuple[str, str]] = []
    nodes: str | None = None
    per_node = ""
    for word in details.split():
        key, _, value = word.partition("=")
        if key == "TresPerNode":
            per_node = value
        elif key == "Nodes":
            if nodes is not None:  # no GRES named for the previous nodes: none there
                listed.append((nodes, ""))
            nodes = value
        elif key in ("GRES", "GRES_IDX") and nodes is not None:
            listed.append((nodes, value))
            nodes = None
    if nodes is not None:
        listed.append((nodes, ""))
    seen = {_base(name) for _, value in listed for name, _ in gres_entries(value)}
    requested = [re.sub(r"^gres[:/]", "", item) for item in per_node.split(",") if re.match(r"gres[:/]", item)]
    job_only = tuple(f"{name}:{count}" for name, count in gres_entries(",".join(requested))
                     if _base(name) not in seen and _base(name) != "gpu" and count != "0")
    return [(nodes, node_gres(value, job_only)) for nodes, value in listed]


def job_gres_per_node(job: str, names: list[str]) -> list[NodeGres] | None:
    """The GRES job `job` has on each of its nodes `names` (SLURM's order; node_gres), or None where `scontrol
    show job -d` does not say (no node details: the steps then take SLURM's default). Raises SlurmCallError."""
    by_name: dict[str, NodeGres] = {}
    for host_list, gres in gres_by_node_list(slurm_call("scontrol", "show", "job", "-d", "--oneliner", job)):
        for name in slurm_call("scontrol", "show", "hostnames", host_list).split():
            by_name[name] = gres
    if not by_name or any(name not in by_name for name in names):
        return None
    return [by_name[name] for name in names]


def gres_option(gres: NodeGres | None) -> list[str]:
    """The step's GRES request: its node's GPUs and other GRES, `--gres=none` for none, nothing for SLURM's
    default (None: not known)."""
    if gres is None or gres.gpus is None:
        return []
    entries = [f"gpu:{gres.gpus}"] * bool(gres.gpus) + list(gres.others)
    return [f"--gres={','.join(entries)}" if entries else "--gres=none"]


def node_names() -> list[str]:
    """The job's nodes in SLURM's order (config/backend.py made them parallel.nodes, in this order). Raises
    SlurmCallError."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
    return slurm_call("scontrol", "show", "hostnames", nodelist).split() if nodelist else []

