"""Cross-field validation of a deployment against a host, and the resolved config it runs with.

`validate_deployment(cfg, target)` returns every problem (never stops at the first, except that a deployment of
more than roles.MAX_RANKS ranks gets only those size problems: the other rules walk every rank) and the resolved
config: device and dtype made concrete, TP filled in per instance group, `max_model_len` from the
model, and the cumem allocator turned on by sleep mode (vLLM #33540, docs/ARCHITECTURE.md "Upstream behaviours
we reproduce").

The batch process of `--backend slurm` (checked_on_nodes) runs no instance: it checks the config only, leaves
`device: auto` (and so dtype auto) unresolved, and leaves what depends on a node's machine (CUDA, GPU count and
memory, sleep mode / the cumem allocator, free memory, the addresses its processes bind, the KV connector's
libraries and devices, the storage path) to each node's step, which validates again on its node
(launcher/backends/slurm_node.py).
"""

from __future__ import annotations

import logging
import os

from pdlaunch.config.addresses import bind_problem
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.model_info import ModelInfo, load_model_info
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.rules import host_memory, memory, offload, resources, roles
from pdlaunch.config.rules.chat_template import chat_template_problems
from pdlaunch.config.rules.checkpoint import block_fp8_tp_rule, checkpoint_problems, runs_fp8_kv_cache
from pdlaunch.config.rules.host import (
    kv_connector_problems,
    log_dir_problems,
    model_cache_problems,
    storage_path_problems,
)
from pdlaunch.config.rules.security import secret_problems
from pdlaunch.config.strict_model import BLOCK_SIZES
from pdlaunch.config.target_host import TargetHost, gpu_memory_bytes, visible_gpus
from pdlaunch.config.topology_config import InstanceGroupConfig
from pdlaunch.memory import host_devices

logger = logging.getLogger(__name__)

SLEEP_ENABLES_CUMEM = "Enabling cumem allocator because sleep mode requires it."
_logged_once: set[str] = set()


def _info_once(message: str) -> None:
    if message not in _logged_once:
        _logged_once.add(message)
        logger.info(message)


def checked_on_nodes(cfg: DeploymentConfig, target: TargetHost | None) -> bool:
    """Whether this is the batch process of `--backend slurm`: no instance runs on this machine (salloc's shell
    is often a login node without GPUs), each node's step checks its own (launcher/backends/slurm_node.py)."""
    return target is None and cfg.launcher.backend == "slurm"


def resolved_device(cfg: DeploymentConfig, target: TargetHost | None) -> str:
    """cpu | cuda. With a target host, `auto` means cuda (the config is checked as if on that host); in the
    slurm batch process it stays `auto`: each node's step resolves it on its node, and the nodes must agree
    (launcher/backends/slurm_lines.py)."""
    if cfg.device == "cpu":
        return "cpu"
    if target is not None:
        return "cuda"
    if checked_on_nodes(cfg, target):
        return cfg.device
    return host_devices.resolve_device(cfg.device)


def group_tp(cfg: DeploymentConfig, group: InstanceGroupConfig) -> int:
    """group.tp, else parallel.prefill_tp / decode_tp for that role, else parallel.tp."""
    if group.tp is not None:
        return group.tp
    role_tp = {"prefill": cfg.parallel.prefill_tp, "decode": cfg.parallel.decode_tp}.get(group.role)
    return role_tp if role_tp is not None else cfg.parallel.tp


def cumem_reason(cfg: DeploymentConfig) -> str:
    """Why the resolved config has the cumem allocator on or off (for the check-config summary)."""
    if cfg.model.enable_sleep_mode:
        return "on (sleep mode requires it)"
    if cfg.model.enable_cumem_allocator:
        return "on (enable_cumem_allocator)"
    return "off"


def cumem_problems(cfg: DeploymentConfig, device: str, cuda: bool) -> list[Problem]:
    """Seed 003: sleep mode turns cumem on (mutates `cfg.model.enable_cumem_allocator`: cfg is the resolved copy);
    both need CUDA, which `cuda` says the instances' hosts have. render kubernetes settles its pods' deployment
    with it too."""
    problems: list[Problem] = []
    model = cfg.model
    if model.enable_sleep_mode:
        if not cuda:
            problems.append(problem("model.enable_sleep_mode", "sleep mode is not supported on current platform",
                                    _needs_cuda("--enable-sleep-mode", device)))
        elif not model.enable_cumem_allocator:
            _info_once(SLEEP_ENABLES_CUMEM)
            model.enable_cumem_allocator = True
    if model.enable_cumem_allocator and not cuda:
        problems.append(problem("model.enable_cumem_allocator", "cumem allocator is not supported on current platform",
                                _needs_cuda("--enable-cumem-allocator", device)))
    return problems


def _needs_cuda(flag: str, device: str) -> str:
    """The fix for a CUDA-only setting refused here. Its device is cuda only where this machine has no usable CUDA
    device: telling that user to `use --device cuda` (as examples/sleep-mode.yaml on a CPU machine was told) names
    what they already have."""
    if device == "cuda":
        return (f"it needs CUDA, and this machine has no usable CUDA device (torch sees none, or the driver's "
                f"libcuda.so.1 is missing); drop {flag}, or run on a CUDA host (`pdlaunch check-config --target-gpus N "
                "--target-gpu-memory GIB` checks a GPU host's deployment from here)")
    return f"it needs CUDA (device is {device}); drop {flag} or use --device cuda"


def _cumem_rules(cfg: DeploymentConfig, device: str, target: TargetHost | None) -> list[Problem]:
    """cumem_problems on this host (or the target), and expandable_segments + connector needs cumem.

    The slurm batch process leaves all of it to each node's step unless the device is cpu: CUDA's support is the
    node's, and so is turning cumem on (a node without CUDA would otherwise be told to drop an
    --enable-cumem-allocator the user never gave).
    """
    if device != "cpu" and checked_on_nodes(cfg, target):
        return []
    # One check stands for both: sleep mode needs of the platform what the cumem allocator needs.
    cuda = device == "cuda" and (target is not None or host_devices.is_cumem_allocator_available())
    problems = cumem_problems(cfg, device, cuda)
    conf_variable = host_devices.expandable_segments_variable()
    if device == "cuda" and not cfg.colocated and not cfg.model.enable_cumem_allocator and conf_variable:
        problems.append(problem(
            "model.enable_cumem_allocator",
            f"{conf_variable} has expandable_segments:True, which breaks KV connector memory registration",
            "pass --enable-cumem-allocator or --enable-sleep-mode, or unset expandable_segments"))
    return problems


def device_rules(cfg: DeploymentConfig, device: str, target: TargetHost | None) -> list[Problem]:
    """CUDA asked for where none is visible (this machine only), and a dtype the device cannot run."""
    problems: list[Problem] = []
    on_this_machine = target is None and not checked_on_nodes(cfg, target)
    if cfg.device == "cuda" and on_this_machine and not host_devices.cuda_available():
        problems.append(problem("device", "cuda requested but no CUDA device is visible on this machine",
                                "use --device cpu, or a machine with a CUDA GPU (`pdlaunch check-config --target-gpus "
                                "N --target-gpu-memory GIB` checks a GPU host's deployment from here)"))
    if device == "cpu" and cfg.model.dtype == "float16":
        problems.append(problem("model.dtype", "float16 is not supported on CPU",
                                "use --dtype bfloat16 or float32 (or auto) on CPU"))
    return problems


def resolve(cfg: DeploymentConfig, target: TargetHost | None) -> DeploymentConfig:
    """A copy with device, dtype and per-group TP made concrete (cumem is settled by the rules)."""
    out = cfg.model_copy(deep=True)
    device = resolved_device(cfg, target)
    out.device = device  # type: ignore[assignment]
    if out.model.dtype == "auto" and device != "auto":
        out.model.dtype = "bfloat16" if device == "cuda" else "float32"
    for group in out.instances:
        own = group.tp is not None
        group.tp = group_tp(cfg, group)
        if not own:  # fields_set names what the user set (config/rules/no_effect.py), not this fill-in
            group.model_fields_set.discard("tp")
    return out


def share_one_gpu(cfg: DeploymentConfig) -> None:
    """On a one-GPU host, a deployment that names no devices puts every instance on GPU 0 and splits
    its memory: what `pdlaunch serve --model demo` on a workstation needs. (KV then moves by push:
    a GPU cannot READ its own memory over cuda_ipc without NVLink.) Mutates the resolved copy."""
    groups = [g for g in cfg.instances if g.count > 0]
    if cfg.parallel.nodes or any(g.devices is not None or (g.tp or 1) != 1 for g in groups):
        return
    sharers = sum(g.count for g in groups)
    if sharers < 2:
        return
    for group in groups:
        group.devices = [0] * group.count
    share = int(0.9 / sharers * 100) / 100  # leave 10% of the GPU to CUDA contexts and fragmentation
    if cfg.cache.gpu_memory_utilization > share:
        given = "gpu_memory_utilization" in cfg.cache.model_fields_set
        cfg.cache.gpu_memory_utilization = share
        if not given:  # fields_set names what the user set (config/rules/no_effect.py), not this split
            cfg.cache.model_fields_set.discard("gpu_memory_utilization")
    _info_once(f"One GPU: {sharers} instances share GPU 0 with gpu_memory_utilization "
               f"{cfg.cache.gpu_memory_utilization} "
               "each (list `devices` per instance group to choose yourself).")


def gpu_nodes_here(cfg: DeploymentConfig, target: TargetHost | None) -> list[int]:
    """The nodes whose GPUs visible_gpus counts: each node, for a target host (it describes every host);
    else the node this machine is (parallel.node_rank), and none for the batch process of `--backend slurm`,
    which runs no node's instances (each node's step checks its own GPUs, launcher/backends/slurm_node.py).
    The other nodes' GPUs are unknown here: placement never depends on them (config/placement.py)."""
    nodes = max(1, len(cfg.parallel.nodes))
    if target is not None or not cfg.parallel.nodes:
        return list(range(nodes))
    return [] if checked_on_nodes(cfg, target) else [cfg.parallel.node_rank]


def model_info_for(cfg: DeploymentConfig) -> tuple[ModelInfo | None, list[Problem]]:
    return load_model_info(cfg.model.path)


def validate_deployment(cfg: DeploymentConfig, target: TargetHost | None) -> tuple[list[Problem], DeploymentConfig]:
    """Every problem of `cfg` on this host (target=None) or on the declared target host, and the resolved config."""
    device = resolved_device(cfg, target)
    out = resolve(cfg, target)
    problems: list[Problem] = roles.size_problems(out)
    if problems:  # the rules below walk every rank: a typo like `count: 3000000` would fill memory there
        return problems, out
    problems += device_rules(cfg, device, target)
    problems += _cumem_rules(out, device, target)
    info, model_problems = model_info_for(out)
    problems += model_problems
    if info is not None:  # config.json parsed: now open what serve opens (tokenizer, weight headers)
        problems += checkpoint_problems(out.model.path, out.model.quantization, runs_fp8_kv_cache(out))
    problems += chat_template_problems(out.model.chat_template)
    if info is not None and out.model.max_model_len is None and info.max_position_embeddings is not None:
        out.model.max_model_len = info.max_position_embeddings
    problems += roles.role_problems(out)
    problems += roles.tp_support_problems(out) + offload.offload_problems(out)
    problems += roles.node_problems(out)
    problems += roles.kv_cache_dtype_problems(out)
    problems += roles.ray_field_problems(out)
    problems += roles.stall_timeout_problems(out)
    problems += roles.cache_problems(out, info)
    if info is not None:
        problems += roles.tp_problems(out, info, block_fp8_tp_rule(out))
    problems += resources.port_problems(out)
    problems += secret_problems(out, os.environ)
    if target is None:  # another host's addresses and directories cannot be checked from here
        problems += log_dir_problems(out) + model_cache_problems(out)
    if target is None and not checked_on_nodes(out, target):  # the slurm batch process: the nodes' own checks
        problems += local_bind_problems(out)
        problems += kv_connector_problems(out)
        problems += storage_path_problems(out)
    here = gpu_nodes_here(out, target)
    gpus = 0 if checked_on_nodes(out, target) else visible_gpus(device, target)  # no torch import there
    if device == "cuda" and gpus == 1:
        share_one_gpu(out)
    # A node checked here without GPUs is _device_rules's; the slurm batch process checks listed devices only.
    if device == "cuda" and (gpus > 0 or target is not None or not here):
        where = "the target host" if target is not None else "this machine"
        problems += resources.device_problems(out, gpus, where, here)
    # `auto` in the slurm batch process: each node estimates against the device it resolves to.
    if (info is not None and out.model.max_model_len is not None and out.cache.block_size in BLOCK_SIZES
            and device != "auto"):
        estimates = memory.estimate(out, info)
        # None: the slurm batch process's machine runs no instance; each node's step checks its GPUs
        gpu_bytes = None if checked_on_nodes(out, target) else gpu_memory_bytes(device, target)
        problems += memory.memory_problems(out, estimates, device, gpu_bytes)
    if target is None:  # the CPU instances this machine runs, against its free memory (warnings: check.py)
        problems += host_memory.host_memory_findings(out, info)[0]
    return problems, out


def local_bind_problems(cfg: DeploymentConfig) -> list[Problem]:
    """The addresses this node's processes bind: the proxy's (node 0) and the KV side channel's."""
    hosts: list[tuple[str, str]] = []
    if cfg.parallel.node_rank == 0:
        hosts.append(("proxy.host", cfg.proxy.host))
    if not cfg.colocated and cfg.kv_transfer.connector in ("nixl", "mooncake"):
        hosts.append(("kv_transfer.side_channel_host", cfg.kv_transfer.side_channel_host))
    found = (bind_problem(field, host) for field, host in hosts)
    return [p for p in found if p is not None]
