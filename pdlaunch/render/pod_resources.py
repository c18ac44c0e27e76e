"""What an instance pod of `pdlaunch render kubernetes` asks Kubernetes for.

GPU pods: their GPUs, as request and limit (an extended resource takes both, equal), nothing more: a GPU rank's
weights and KV cache are in device memory, and the GPUs already choose the node. CPU pods (device cpu): CPU and
memory requests, so the scheduler places them on a node with room for them rather than packing them onto one that
then kills them for memory. A CPU rank allocates at start its whole KV cache (`cache.num_gpu_blocks` blocks when
set, else `cache.cpu_kv_cache_gb` rounded down to whole blocks), its weight shard (config/rules/memory.py, from the
checkpoint's config.json) and rank 0 the `cache.kv_offload_gb` tier, as config/rules/host_memory.py counts them on
one host, plus RUNTIME_MIB_PER_RANK for the process itself. The weights count only when the checkpoint's
config.json (or .gguf header) is readable here (`tiny`, `demo`, or a checkpoint at model.path on this machine too);
else the request is KV and runtime only, and render says so.

Requests only, no limits: the estimate is a lower bound (activations come on top), and a memory limit at it would
have the kernel kill the instance; a CPU limit would throttle the engine's steps (CFS quota) while the node has idle
cores. The user sets them: --cpu-pod-memory replaces the estimate as every CPU engine pod's memory request, and
--cpu-pod-memory-limit gives each a memory limit (at least its request: Kubernetes refuses a pod whose limit is
below it). Each rank's torch thread pool is sized to the cores requested for it (OMP_NUM_THREADS), as the local
launcher gives each instance its share of the cores (launcher/child_commands.py cpu_threads): else every pod would
start one thread per core of the node, and a node's pods would contend for the same cores.
"""

from __future__ import annotations

import re
from decimal import Decimal

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.model_info import load_model_info
from pdlaunch.config.rules.memory import GIB, GroupMemory, estimate
from pdlaunch.render.core_api import EnvVar, Resources

GPU_RESOURCE = "nvidia.com/gpu"
# A CPU rank's cores: one for its engine's steps (torch's intra-op pool), one for the HTTP server's event loop,
# tokenization and the KV transfer threads, which would otherwise wait behind a step.
CPU_CORES_PER_RANK = 2
# A CPU rank's process beyond its weights and KV cache (Python, torch, the server, a step's activations): a `tiny`
# prefill or decode instance (`pdlaunch serve --model tiny --device cpu`: 10 MiB of float32 weights, the default
# 1 GiB KV cache) held 1448 MiB resident (VmHWM) after serving requests, so about 415 MiB; 512 leaves room to spare.
RUNTIME_MIB_PER_RANK = 512
MIB = 1 << 20
MEMORY_FLAG, MEMORY_LIMIT_FLAG = "--cpu-pod-memory", "--cpu-pod-memory-limit"
# A Kubernetes quantity (k8s.io/apimachinery resource.Quantity): a number, then a binary or decimal SI suffix or a
# decimal exponent. `m` is milli: `512m` of memory is half a byte, a common slip for 512M.
_QUANTITY = re.compile(r"\+?(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[mkMGTPE]|[eE][-+]?[0-9]+)?")
_SCALE = {"": Decimal(1), "m": Decimal("0.001"), **{s: Decimal(1000) ** (i + 1) for i, s in enumerate("kMGTPE")},
          **{f"{s}i": Decimal(1024) ** (i + 1) for i, s in enumerate("KMGTPE")}}


def cpu_estimates(cfg: DeploymentConfig) -> list[GroupMemory] | None:
    """config/rules/memory.py's per-group estimate of the resolved CPU config; None on CUDA, or when the checkpoint's
    config.json is not readable here (model.path is the pod's path: the model may be on its volume only)."""
    if cfg.device != "cpu":
        return None
    info, _ = load_model_info(cfg.model.path)
    return estimate(cfg, info) if info is not None else None


def cpu_pod_bytes(cfg: DeploymentConfig, ranks: int, group: GroupMemory | None) -> int:
    """What a CPU pod running `ranks` TP ranks of an instance (rank 0 among them) allocates, bytes; `group`: its
    group's estimate, None when unknown (then no weights, and the KV cache at cpu_kv_cache_gb unless a block count
    of unknown size sets it)."""
    cache = cfg.cache
    budget = int(cache.cpu_kv_cache_gb * GIB)
    if group is None:
        weights, kv = 0, budget if cache.num_gpu_blocks is None else 0
    else:
        block = max(1, group.kv_block_bytes)
        weights = group.weights_bytes
        kv = cache.num_gpu_blocks * block if cache.num_gpu_blocks is not None else budget // block * block
    return ranks * (weights + kv + RUNTIME_MIB_PER_RANK * MIB) + int(cache.kv_offload_gb * GIB)


def quantity_bytes(value: str) -> Decimal | None:
    """The bytes a Kubernetes quantity stands for, or None when `value` is none."""
    found = _QUANTITY.fullmatch(value)
    if found is None:
        return None
    suffix = found.group("suffix") or ""
    scale = Decimal(10) ** int(suffix[1:]) if suffix[:1] in "eE" and len(suffix) > 1 else _SCALE[suffix]
    return Decimal(found.group("number")) * scale


def memory_flag_problems(request: str | None, limit: str | None) -> list[tuple[str, str]]:
    """What Kubernetes would refuse, or take for something else, in --cpu-pod-memory / --cpu-pod-memory-limit."""
    problems: list[tuple[str, str]] = []
    for flag, value in ((MEMORY_FLAG, request), (MEMORY_LIMIT_FLAG, limit)):
        if value is None:
            continue
        size = quantity_bytes(value)
        if size is None:
            problems.append((flag, f"{value!r} is not a Kubernetes quantity: write a number and a unit, "
                             "Ki Mi Gi Ti (powers of 1024) or k M G T (of 1000), e.g. 4Gi"))
        elif value.endswith("m"):
            problems.append((flag, f"{value!r} is {size.normalize():f} bytes (m is milli): write {value[:-1]}Mi or "
                             f"{value[:-1]}M"))
        elif size < 1:
            problems.append((flag, f"{value!r} is no memory: give each CPU engine pod's memory, e.g. 4Gi"))
    return problems


def pod_memory_problems(cfg: DeploymentConfig, request: str | None, limit: str | None,
                        estimates: list[GroupMemory] | None) -> list[tuple[str, str]]:
    """The memory flags against the resolved deployment (well-formed: memory_flag_problems): CPU pods only, and a
    limit not below any engine pod's request."""
    if cfg.device != "cpu":
        given = [flag for flag, value in ((MEMORY_FLAG, request), (MEMORY_LIMIT_FLAG, limit)) if value is not None]
        return [(flag, "sizes CPU engine pods (device cpu), and this deployment's pods run on GPUs, which ask for "
                 "their GPUs only: leave it out") for flag in given]
    if limit is None:
        return []
    ceiling = quantity_bytes(limit) or Decimal(0)
    if request is not None:
        if ceiling < (quantity_bytes(request) or 0):
            return [(MEMORY_LIMIT_FLAG, f"{limit} is below the memory each CPU engine pod requests ({request}, "
                     f"{MEMORY_FLAG}), and Kubernetes refuses a limit below the request: raise it, or lower "
                     f"{MEMORY_FLAG}")]
        return []
    for g, group in enumerate(cfg.instances):  # a CPU pod runs the whole instance: all its tp ranks
        asked = memory_request(cfg, group.tp or 1, estimates[g] if estimates is not None else None)
        if group.count > 0 and ceiling < (quantity_bytes(asked) or 0):
            return [(MEMORY_LIMIT_FLAG, f"{limit} is below the memory {group.role} pods request ({asked}, the "
                     f"estimate), and Kubernetes refuses a limit below the request: raise it, or set the request "
                     f"with {MEMORY_FLAG} (the estimate is what the instance allocates at start)")]
    return []


def memory_request(cfg: DeploymentConfig, ranks: int, group: GroupMemory | None) -> str:
    """The estimate of cpu_pod_bytes as a quantity, whole MiB rounded up."""
    return f"{-(-cpu_pod_bytes(cfg, ranks, group) // MIB)}Mi"


def engine_resources(cfg: DeploymentConfig, group: int, ranks: int, estimates: list[GroupMemory] | None,
                     memory: str | None = None, memory_limit: str | None = None) -> Resources:
    """The resources of an instance pod running `ranks` TP ranks of instance group `group`: its GPUs on CUDA, else
    CPU and memory requests (module docstring); `estimates`: cpu_estimates'. `memory`, `memory_limit`: the CPU pods'
    --cpu-pod-memory and --cpu-pod-memory-limit, where given."""
    if cfg.device == "cuda":
        return {"requests": {GPU_RESOURCE: str(ranks)}, "limits": {GPU_RESOURCE: str(ranks)}}
    request = memory or memory_request(cfg, ranks, estimates[group] if estimates is not None else None)
    resources: Resources = {"requests": {"cpu": str(CPU_CORES_PER_RANK * ranks), "memory": request}}
    if memory_limit is not None:
        resources["limits"] = {"memory": memory_limit}
    return resources


def engine_threads(cfg: DeploymentConfig) -> list[EnvVar]:
    """A CPU pod's torch thread pool: a rank's share of the cores the pod requests (module docstring)."""
    return [{"name": "OMP_NUM_THREADS", "value": str(CPU_CORES_PER_RANK)}] if cfg.device == "cpu" else []
