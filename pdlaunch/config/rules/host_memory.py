"""The memory every instance on this machine takes at start, against what the host has free.

CPU deployments: a CPU instance allocates its whole KV cache when it starts (runner/kv_cache_tensors.py:
`cache.num_gpu_blocks` blocks when set, else `cache.cpu_kv_cache_gb` rounded down to whole blocks, on every TP
rank), holds its weight shard (config/rules/memory.py estimates it from config.json) and, with
`cache.kv_offload_gb`, an offload tier of that size (offload/cpu_tier.py). GPU deployments: only the offload tiers
live in host memory for good, one per instance (the tier is the engine's, in rank 0's process; offload runs with
TP 1 only, config/rules/offload.py), zeroed and on CUDA pinned at start. The sum over what this machine runs is
compared with what a process started now may take (memory/host_devices.available_memory): MemAvailable of
/proc/meminfo, what the kernel can give new processes without swapping (free memory and reclaimable caches), so
memory other processes hold counts, which the machine's RAM would not show; or, where lower, the room under the
memory limit of this process's cgroup (a container's, a Kubernetes pod's), which the instances it starts share.

The ranks this machine runs: every rank on one node; with `parallel.nodes`, those the port plan places on node
`parallel.node_rank` (config/port_plan.py). Only the local launcher's: the `--backend slurm` batch process runs
none (each node's step checks its own, launcher/backends/slurm_node.py), Ray places ranks on its cluster's
nodes, and a declared target host (`--target-gpus`) is not this machine.

Refuse or warn. The estimate is a lower bound: activations and each process's Python and torch runtime (a few
hundred MiB each; with CUDA, more) come on top. A need above what is available therefore cannot fit: refused,
instead of the kernel's out-of-memory killer ending an instance (or the user's session) minutes after start with
no pdlaunch error. A need above WARN_SHARE of it may still fit (the page cache MemAvailable counts is only partly
reclaimable, other processes grow and shrink, KV rounds down to whole blocks) but leaves little room for what the
estimate leaves out: a warning, not a refusal, because an up-front check should refuse only what cannot work, and
MemAvailable is the kernel's estimate of one moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.model_info import ModelInfo
from pdlaunch.config.port_plan import plan_instances
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.rules.memory import GIB, GroupMemory, estimate
from pdlaunch.config.strict_model import BLOCK_SIZES
from pdlaunch.memory import host_devices

WARN_SHARE = 0.9  # of what is available: above it, a warning (see the module docstring)
AVAILABLE = "MemAvailable, or a cgroup memory limit less its usage where lower"  # what "available" is, in messages


def available_memory_bytes() -> int | None:
    """What a process started now may take (host_devices.available_memory: the least of MemAvailable and the
    room under this process's cgroup memory limits; the physical RAM where the kernel gives no MemAvailable); None
    when nothing can be read (then nothing is checked)."""
    available = host_devices.available_memory()
    return None if available is None else available.bytes


@dataclass(frozen=True)
class HostNeed:
    """What the CPU ranks this machine runs allocate at start, bytes, and what the KV size setting may become."""

    ranks: int
    weights_bytes: int
    kv_bytes: int
    offload_bytes: int
    kv_field: str  # the setting that sizes the KV cache: cache.num_gpu_blocks or cache.cpu_kv_cache_gb
    kv_per_unit: int  # bytes the ranks here allocate per block (num_gpu_blocks) or per GiB (cpu_kv_cache_gb)
    kv_least: float  # the least value of kv_field that still holds one max_model_len sequence on every rank

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.offload_bytes

    def kv_that_fits(self, available: int) -> float | None:
        """The largest value of kv_field with which the ranks fit in `available` bytes (blocks, or GiB rounded
        down to 0.01); None when no value that holds one sequence does: the instances themselves are too many."""
        room = available - self.weights_bytes - self.offload_bytes
        if room <= 0 or self.kv_per_unit <= 0:
            return None
        units = room / self.kv_per_unit
        value = float(int(units)) if self.kv_field == "cache.num_gpu_blocks" else math.floor(units * 100) / 100
        return value if value >= self.kv_least else None


def host_need(cfg: DeploymentConfig, estimates: list[GroupMemory]) -> HostNeed:
    """What the ranks on this machine (node `parallel.node_rank`) of the resolved CPU config allocate at start."""
    cache, me = cfg.cache, cfg.parallel.node_rank
    blocks = cache.num_gpu_blocks
    budget = int(cache.cpu_kv_cache_gb * GIB)
    offload = int(cache.kv_offload_gb * GIB)
    ranks = weights = kv = offloads = per_unit = 0
    least = 0.0
    for planned in plan_instances(cfg, [], strict=False):
        est = estimates[planned.group]
        block = max(1, est.kv_block_bytes)
        here = sum(1 for rank in planned.ranks if rank.node == me)
        ranks += here
        weights += here * est.weights_bytes
        kv += here * (blocks * block if blocks is not None else budget // block * block)
        per_unit += here * (block if blocks is not None else GIB)
        if planned.ranks and planned.ranks[0].node == me:  # the engine, and its offload tier, is rank 0's
            offloads += offload
        if here and blocks is None:  # est.kv_bytes is one max_model_len sequence when no block count is set
            least = max(least, est.kv_bytes / GIB)
    if blocks is not None:
        least = -(-(cfg.model.max_model_len or 0) // max(1, cache.block_size))  # blocks of one sequence
    field = "cache.num_gpu_blocks" if blocks is not None else "cache.cpu_kv_cache_gb"
    return HostNeed(ranks, weights, kv, offloads, field, per_unit, least)


def need_here(cfg: DeploymentConfig, info: ModelInfo | None) -> HostNeed | None:
    """host_need of the resolved config when it runs CPU instances on this machine under the local launcher
    (module docstring) and its model and cache sizes are known; else None."""
    if (cfg.device != "cpu" or cfg.launcher.backend != "local" or info is None or cfg.model.max_model_len is None
            or cfg.cache.block_size not in BLOCK_SIZES):
        return None
    need = host_need(cfg, estimate(cfg, info))
    return need if need.ranks else None


@dataclass(frozen=True)
class OffloadNeed:
    """The KV offload tiers of the GPU instances this machine runs: one per instance (the engine's, rank 0's)."""

    instances: int
    per_instance: int  # bytes: cache.kv_offload_gb

    @property
    def total_bytes(self) -> int:
        return self.instances * self.per_instance


def offload_here(cfg: DeploymentConfig) -> OffloadNeed | None:
    """The offload tiers of the resolved config when it runs GPU instances with `cache.kv_offload_gb` on this
    machine under the local launcher (module docstring); else None. Each instance's tier is its engine's, in its
    rank 0's process: counted where rank 0 runs (TP > 1 with offload is refused, config/rules/offload.py)."""
    if cfg.device != "cuda" or cfg.launcher.backend != "local" or cfg.cache.kv_offload_gb <= 0:
        return None
    me = cfg.parallel.node_rank
    instances = sum(1 for planned in plan_instances(cfg, [], strict=False)
                    if planned.ranks and planned.ranks[0].node == me)
    return OffloadNeed(instances, int(cfg.cache.kv_offload_gb * GIB)) if instances else None


def _offload_findings(need: OffloadNeed, available: int) -> tuple[list[Problem], list[Problem]]:
    """(problems, warnings) of the GPU instances' offload tiers here against what is available."""
    if need.total_bytes <= WARN_SHARE * available:
        return [], []
    fits = math.floor(WARN_SHARE * available / need.instances / GIB * 100) / 100
    each = "" if need.instances == 1 else f" (each of the {need.instances} instances allocates it whole)"
    fix = (f"lower cache.kv_offload_gb to {f'{fits:.2f}'.rstrip('0').rstrip('.')} or less{each}" if fits > 0
           else "set cache.kv_offload_gb to 0 (offload off)")
    hint = f"{fix}, run fewer instances here, or stop what else holds this machine's memory (`free -g`)"
    what = (f"the {need.instances} GPU instance(s) on this machine keep a KV offload tier of "
            f"{_gib(need.per_instance)} GiB each in host memory, {_gib(need.total_bytes)} GiB in all")
    if need.total_bytes > available:
        return [problem("cache.kv_offload_gb", f"{what}, but only {_gib(available)} GiB is available ({AVAILABLE}): "
                        "zeroing (and pinning) them would get an instance killed for memory", hint)], []
    return [], [problem("cache.kv_offload_gb", f"{what}, {need.total_bytes / available:.0%} of the "
                        f"{_gib(available)} GiB available ({AVAILABLE}): each engine's own host memory (the CUDA "
                        "runtime, the weights while they load) comes on top, so an instance may be killed for "
                        "memory", hint)]


def host_memory_line(cfg: DeploymentConfig, info: ModelInfo | None) -> str | None:
    """check-config's summary line: what the CPU ranks here allocate at start (or the GPU instances' offload tiers
    keep), and what the machine has free."""
    offload = offload_here(cfg)
    need = need_here(cfg, info) if offload is None else None
    available = available_memory_bytes() if offload is not None or need is not None else None
    if available is None:
        return None
    if offload is not None:
        return (f"this machine: {offload.instances} GPU instance(s) keep KV offload tiers of "
                f"{_gib(offload.total_bytes)} GiB in all of {_gib(available)} GiB available")
    if need is None:
        return None
    return (f"this machine: {need.ranks} CPU rank(s) allocate about {_gib(need.total_bytes)} GiB at start "
            f"({_parts(need)}) of {_gib(available)} GiB available")


def host_memory_findings(cfg: DeploymentConfig, info: ModelInfo | None) -> tuple[list[Problem], list[Problem]]:
    """(problems, warnings) of the resolved config's CPU instances on this machine (or its GPU instances' KV
    offload tiers: offload_here) against what it has available; none when the config runs neither here under the
    local launcher (module docstring). Call it only when the config is checked on this machine, not against a
    declared target host."""
    offload = offload_here(cfg)
    if offload is not None:
        available = available_memory_bytes()
        return ([], []) if available is None else _offload_findings(offload, available)
    need = need_here(cfg, info)
    available = available_memory_bytes() if need is not None else None
    if need is None or available is None or need.total_bytes <= WARN_SHARE * available:
        return [], []
    fits = need.kv_that_fits(int(WARN_SHARE * available))
    field = "instances" if fits is None else need.kv_field
    hint = _hint(cfg, need, fits)
    what = (f"the {need.ranks} CPU rank(s) on this machine need about {_gib(need.total_bytes)} GiB at start "
            f"({_parts(need)})")
    if need.total_bytes > available:
        return [problem(field, f"{what} but only {_gib(available)} GiB is available ({AVAILABLE}): the kernel "
                        "would kill an instance for memory", hint)], []
    return [], [problem(field, f"{what}, {need.total_bytes / available:.0%} of the {_gib(available)} GiB "
                        f"available ({AVAILABLE}): activations and each process's runtime come on top, so an "
                        "instance may be killed for memory", hint)]


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def _parts(need: HostNeed) -> str:
    parts = f"weights {_gib(need.weights_bytes)} + KV cache {_gib(need.kv_bytes)}"
    return parts + (f" + KV offload tier {_gib(need.offload_bytes)} GiB" if need.offload_bytes else " GiB")


def _hint(cfg: DeploymentConfig, need: HostNeed, fits: float | None) -> str:
    """Lower the KV size setting to a value that fits (with room to spare), else run fewer instances here."""
    offload = ", or a smaller cache.kv_offload_gb" if need.offload_bytes else ""
    others = f"stop what else holds this machine's memory (`free -g`){offload}"
    if fits is not None:
        value = f"{int(fits)}" if need.kv_field == "cache.num_gpu_blocks" else f"{fits:.2f}".rstrip("0").rstrip(".")
        each = "" if need.ranks == 1 else f" (each of the {need.ranks} ranks allocates it whole)"
        return f"lower {need.kv_field} to {value} or less{each}, run fewer instances here, or {others}"
    where = " or spread them over parallel.nodes" if not cfg.parallel.nodes else ""
    dtype = " or --dtype bfloat16 (half of float32's weights)" if cfg.model.dtype == "float32" else ""
    return f"run fewer instances on this machine{where}, a smaller model{dtype}, or {others}"
