"""Memory estimate per instance group: weights + the KV cache of one max_model_len sequence, per TP rank.

GPU: compared with gpu_memory_utilization x device memory. CPU: the KV part with cache.cpu_kv_cache_gb
and all instances together with the machine's RAM. Activations are not counted: this is a lower bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.model_info import DTYPE_BYTES, ModelInfo
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.topology_config import group_kv_cache_dtype

GIB = 1 << 30


@dataclass(frozen=True)
class GroupMemory:
    group: int
    role: str
    tp: int
    weights_bytes: int  # per TP rank
    kv_bytes: int  # per TP rank: num_gpu_blocks if set, else one max_model_len sequence

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes


def estimate(cfg: DeploymentConfig, info: ModelInfo) -> list[GroupMemory]:
    """Per-rank estimate of every instance group of the resolved config (dtype and max_model_len concrete)."""
    dtype_bytes = DTYPE_BYTES.get(cfg.model.dtype, 4)
    weights = info.num_parameters() * dtype_bytes
    block = max(1, cfg.cache.block_size)  # an invalid block size is reported by rules; estimate anyway
    max_len = cfg.model.max_model_len or info.max_position_embeddings or 0
    tokens = cfg.cache.num_gpu_blocks * block if cfg.cache.num_gpu_blocks else -(-max_len // block) * block
    out = []
    for i, group in enumerate(cfg.instances):
        tp = group.tp or 1
        # (FP8 weights: counted at dtype)
        kv_dtype_bytes = 1 if group_kv_cache_dtype(cfg.cache, group) == "fp8" else dtype_bytes
        out.append(GroupMemory(i, group.role, tp, -(-weights // tp),
                               tokens * info.kv_bytes_per_token(kv_dtype_bytes, tp)))
    return out


def device_budget_bytes(cfg: DeploymentConfig, gpu_memory_bytes: int) -> int:
    return int(cfg.cache.gpu_memory_utilization * gpu_memory_bytes)


def host_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_problems(cfg: DeploymentConfig, estimates: list[GroupMemory], device: str,
                    gpu_memory_bytes: int | None, ram_bytes: int | None) -> list[Problem]:
    """Groups whose per-rank need exceeds the device budget (GPU) or the CPU KV budget / RAM (CPU). None for a
    machine's GPU memory or RAM: not checked (the slurm batch process leaves them to each node's step)."""
    problems: list[Problem] = []
    if device == "cuda":
        if gpu_memory_bytes is None:
            return problems
        budget = device_budget_bytes(cfg, gpu_memory_bytes)
        for est in estimates:
            if cfg.instances[est.group].count and est.total_bytes > budget:
                problems.append(problem(
                    f"instances[{est.group}]",
                    f"{est.role} needs {est.total_bytes / GIB:.2f} GiB per GPU "
                    f"(weights {est.weights_bytes / GIB:.2f} + "
                    f"KV {est.kv_bytes / GIB:.2f}) but the budget is {budget / GIB:.2f} GiB "
                    f"({cfg.cache.gpu_memory_utilization} x {gpu_memory_bytes / GIB:.1f} GiB)",
                    "raise TP, lower --max-model-len/--num-gpu-blocks, or raise --gpu-memory-utilization"))
        return problems
    kv_budget = int(cfg.cache.cpu_kv_cache_gb * GIB)
    for est in estimates:
        if cfg.instances[est.group].count and est.kv_bytes > kv_budget:
            problems.append(problem(
                "cache.cpu_kv_cache_gb",
                f"{est.role} needs {est.kv_bytes / GIB:.2f} GiB of KV for one max_model_len sequence, "
                f"more than cpu_kv_cache_gb {cfg.cache.cpu_kv_cache_gb}",
                "raise cache.cpu_kv_cache_gb or lower --max-model-len"))
    if ram_bytes is not None:
        # On CPU each instance holds its weights plus its whole KV budget (allocated up front).
        total = sum(cfg.instances[e.group].count * e.tp * (e.weights_bytes + max(e.kv_bytes, kv_budget))
                    for e in estimates)
        if total > ram_bytes:
            problems.append(problem("instances", f"the CPU instances need about {total / GIB:.1f} GiB, more than "
                                    f"this machine's {ram_bytes / GIB:.1f} GiB of RAM",
                                    "run fewer instances, a smaller model, or a smaller cache.cpu_kv_cache_gb"))
    return problems
