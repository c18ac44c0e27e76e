"""Memory estimate per instance group: weights + the KV cache of one max_model_len sequence, per TP rank.

On a GPU the projections of an FP8 checkpoint count one byte a weight (they load as fp8; a GPU without FP8
GEMMs dequantizes them, which only makes the need larger), and so do MoE experts under `--quantization fp8`
(quantized as each one loads), in both cases where 128x128 blocks tile a rank's experts (else they load in the model
dtype); the other projections `--quantization fp8` quantizes count at the model dtype, as they load.
GPU: compared with gpu_memory_utilization x device memory. CPU: the KV part with cache.cpu_kv_cache_gb (when
it sizes the KV cache: cache.num_gpu_blocks does when set, config/rules/roles.py checks that against one
sequence); what every CPU instance on this machine takes together is config/rules/host_memory.py's. Activations
are not counted: this is a lower bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.model_info import DTYPE_BYTES, ModelInfo
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.topology_config import group_expert_parallel, group_kv_cache_dtype
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.moe.names import expert_checkpoint_names  # torch-free
from pdlaunch.model.quant.config import BLOCK, QuantConfig, load_quant_config, online_quant_config  # torch-free

GIB = 1 << 30


@dataclass(frozen=True)
class GroupMemory:
    group: int
    role: str
    tp: int
    weights_bytes: int  # per TP rank
    kv_bytes: int  # per TP rank: num_gpu_blocks if set, else one max_model_len sequence
    kv_block_bytes: int  # one KV block of every layer, per TP rank (runner/kv_cache_tensors.py block_bytes)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes


def estimate(cfg: DeploymentConfig, info: ModelInfo) -> list[GroupMemory]:
    """Per-rank estimate of every instance group of the resolved config (dtype and max_model_len concrete)."""
    dtype_bytes = DTYPE_BYTES.get(cfg.model.dtype, 4)
    weights = info.num_parameters() * dtype_bytes
    quant = deployment_quant_config(cfg) if cfg.device == "cuda" else None  # CPU: FP8 weights dequantized
    block = max(1, cfg.cache.block_size)  # an invalid block size is reported by rules; estimate anyway
    max_len = cfg.model.max_model_len or info.max_position_embeddings or 0
    tokens = cfg.cache.num_gpu_blocks * block if cfg.cache.num_gpu_blocks else -(-max_len // block) * block
    out = []
    for i, group in enumerate(cfg.instances):
        tp = group.tp or 1
        kv_dtype_bytes = 1 if group_kv_cache_dtype(cfg.cache, group) == "fp8" else dtype_bytes
        per_token = info.kv_bytes_per_token(kv_dtype_bytes, tp)
        fp8 = fp8_parameters(info, quant, _fp8_experts(info, tp, group_expert_parallel(cfg.parallel, group)))
        group_weights = weights - fp8 * (dtype_bytes - 1)
        out.append(GroupMemory(i, group.role, tp, -(-group_weights // tp), tokens * per_token, block * per_token))
    return out


def deployment_quant_config(cfg: DeploymentConfig) -> QuantConfig | None:
    """The checkpoint's FP8 format (or --quantization fp8's); None when unquantized or unreadable (a broken
    quantization_config is checkpoint_problems' to report)."""
    path = cfg.model.path
    if path in ("demo", "tiny") or path.lower().endswith(".gguf"):  # no quantization_config of their own
        return None if cfg.model.quantization is None else online_quant_config()
    try:
        return load_quant_config(Path(os.path.expanduser(path)), cfg.model.quantization)
    except PdlaunchError:
        return None


def _fp8_experts(info: ModelInfo, tp: int, expert_parallel: bool) -> bool:
    """Whether a rank's MoE experts load as 128x128-block fp8 (model/moe/experts.py prepare_fp8_blocks): their
    width on the rank and the hidden size are multiples of 128; else they stay in the model dtype."""
    moe = info.moe
    if moe is None:
        return False
    width = moe.expert_intermediate_size if expert_parallel else moe.expert_intermediate_size // tp
    return width % BLOCK == 0 and info.hidden_size % BLOCK == 0


def fp8_parameters(info: ModelInfo, quant: QuantConfig | None, experts_fp8: bool = True) -> int:
    """Weights a GPU holds as fp8 while the model loads (the module docstring says which): an FP8 checkpoint's
    attention and MLP projections, experts and shared expert, less those its ignore list keeps in the model dtype;
    only the experts under --quantization fp8. Experts count where `experts_fp8` (their blocks tile this rank's
    share). Embeddings, lm_head, norms and routers never count."""
    if quant is None:
        return 0
    h, d, moe = info.hidden_size, info.head_dim, info.moe
    checkpoint = quant.source == "checkpoint"
    attention = {"q_proj": h * info.num_heads * d, "k_proj": h * info.num_kv_heads * d,
                 "v_proj": h * info.num_kv_heads * d, "o_proj": info.num_heads * d * h}
    total = 0
    for layer in range(info.num_layers):
        prefix = f"model.layers.{layer}"
        if checkpoint:
            total += sum(size for proj, size in attention.items() if not quant.skips(f"{prefix}.self_attn.{proj}"))
        if moe is None or not moe.is_sparse(layer):
            if checkpoint:
                total += sum(h * info.intermediate_size for proj in ("gate_proj", "up_proj", "down_proj")
                             if not quant.skips(f"{prefix}.mlp.{proj}"))
            continue
        # expert 0's projections only (all of them took 0.25 s for Qwen3-30B-A3B): an ignore list naming a later
        # expert alone keeps the layer in the model dtype, and the estimate stays a lower bound
        first = [name.removesuffix(".weight") for param in ("w13", "w2")
                 for name in expert_checkpoint_names(f"{prefix}.mlp.experts.{param}", moe) or []
                 if ".experts.0." in name]
        if experts_fp8 and not any(quant.skips(name) for name in first):  # else they stay in the model dtype
            total += moe.num_experts * 3 * h * moe.expert_intermediate_size
        shared = moe.shared_expert_intermediate_size
        if checkpoint and shared and not quant.skips(f"{prefix}.mlp.shared_expert.down_proj"):
            total += 3 * h * shared
    return total


def device_budget_bytes(cfg: DeploymentConfig, gpu_memory_bytes: int) -> int:
    return int(cfg.cache.gpu_memory_utilization * gpu_memory_bytes)


def memory_problems(cfg: DeploymentConfig, estimates: list[GroupMemory], device: str,
                    gpu_memory_bytes: int | None) -> list[Problem]:
    """Groups whose per-rank need exceeds the device budget (GPU) or whose one sequence exceeds the CPU KV budget
    (CPU). None for a machine's GPU memory: not checked (the slurm batch process leaves it to each node's step)."""
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
    if cfg.cache.num_gpu_blocks is not None:  # it sizes the KV cache, cpu_kv_cache_gb does nothing
        return problems
    kv_budget = int(cfg.cache.cpu_kv_cache_gb * GIB)
    for est in estimates:
        if cfg.instances[est.group].count and est.kv_bytes > kv_budget:
            problems.append(problem(
                "cache.cpu_kv_cache_gb",
                f"{est.role} needs {est.kv_bytes / GIB:.2f} GiB of KV for one max_model_len sequence, "
                f"more than cpu_kv_cache_gb {cfg.cache.cpu_kv_cache_gb}",
                "raise cache.cpu_kv_cache_gb or lower --max-model-len"))
    return problems
