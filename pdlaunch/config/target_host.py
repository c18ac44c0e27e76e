"""The GPU host a config is checked against: a declared target host (check-config's `--target-gpus N
--target-gpu-memory GIB`, the Ray cluster's nodes under `--backend ray`, render's pods), else this machine; and
what validation reads of it: the GPUs per node and the memory of one.

Apart from the rules (validate.py runs them) because a target host is how a config is checked for a machine it is
not on: every figure below comes from it when there is one, and never from this machine's devices then.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.rules import memory, roles
from pdlaunch.config.strict_model import MAX_GIB
from pdlaunch.memory import host_devices


@dataclass(frozen=True)
class TargetHost:
    """The GPU host a config is meant for (`--target-gpus N --target-gpu-memory GIB`), when not this one."""

    gpus: int
    gpu_memory_gib: float
    source: str = "declared"  # where the figures come from, as check-config prints it


def target_problems(
    target_gpus: int | None, target_gpu_memory: float | None
) -> tuple[TargetHost | None, list[Problem]]:
    """The declared target host from the two check-config flags, or the problems with them."""
    if target_gpus is None and target_gpu_memory is None:
        return None, []
    problems: list[Problem] = []
    if target_gpus is None or target_gpu_memory is None:
        missing = "--target-gpus" if target_gpus is None else "--target-gpu-memory"
        problems.append(problem(missing, "a target host needs both --target-gpus and --target-gpu-memory",
                                f"add {missing}"))
    if target_gpus is not None and not 1 <= target_gpus <= roles.MAX_RANKS:
        problems.append(problem("--target-gpus", f"must be 1..{roles.MAX_RANKS}, got {target_gpus}",
                                "give the GPU count of one host"))
    if target_gpu_memory is not None and not 0 < target_gpu_memory <= MAX_GIB:
        problems.append(problem("--target-gpu-memory", f"must be a positive number of GiB up to {MAX_GIB}, "
                                f"got {target_gpu_memory}", "e.g. --target-gpu-memory 80"))
    if problems:
        return None, problems
    assert target_gpus is not None and target_gpu_memory is not None
    return TargetHost(gpus=target_gpus, gpu_memory_gib=target_gpu_memory), []


def visible_gpus(device: str, target: TargetHost | None) -> int:
    """GPUs per node that devices are checked against: the target host's, else this machine's (the nodes
    validate.gpu_nodes_here names)."""
    if target is not None:
        return target.gpus
    return host_devices.device_count() if device == "cuda" else 0


def gpu_memory_bytes(device: str, target: TargetHost | None) -> int | None:
    """Memory of one GPU (the smallest visible one), or None on CPU / without a GPU."""
    if device != "cuda":
        return None
    if target is not None:
        return int(target.gpu_memory_gib * memory.GIB)
    count = host_devices.device_count()
    return min(host_devices.device_total_bytes(i) for i in range(count)) if count else None
