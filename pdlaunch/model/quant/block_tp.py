"""Which block-FP8 projections a TP size cuts off the 128-wide scale blocks, read from config.json alone: the
checkpoint's TP rule (`block_tp_rule`, a model/tp_split.py TPRule) that check-config (config/rules/roles.py
`tp_problems`) and the load (model/loader.py `meta_model`) report beside the split rules, in one list, before the
load's own check of each layer (model/quant/linear.py `_check_block_edges`). Torch-free.

Tensor parallelism splits the attention projections, the dense MLP and Qwen2-MoE's shared expert (model/moe/block.py
`SharedExpert`: split by TP with --enable-expert-parallel too, which places only the routed experts whole); each rank's
shard must start on a 128 edge so its block scales are whole blocks. At TP 1 nothing is split, but q/k/v and gate/up
are each fused into one matmul, so k, v and up must start on a 128 edge too: a model whose widths miss one there is
refused at every TP size (check-config's weight check names the layer, as the load does). What does not count:
- the routed experts: dequantized before they are sharded (model/quant/experts.py), they stay in the model dtype where
  128x128 blocks do not tile a rank's share;
- a dense MLP no layer builds: Mixtral's and OLMoE's intermediate_size is their experts' width, and a Qwen-MoE builds
  its dense MLP only in the layers of mlp_only_layers or off its decoder_sparse_step;
- projections the checkpoint keeps unquantized (its ignore list): they load in the model dtype.
"""

from __future__ import annotations

from collections.abc import Callable

from pdlaunch.model.arch import ModelArch
from pdlaunch.model.quant.config import BLOCK, QuantConfig
from pdlaunch.model.tp_split import SplitProblem, TPRule

MLP = ("gate_proj", "up_proj", "down_proj")
# How a misaligned shared expert is named (block_tp_rule adds what expert parallel changes to it).
SHARED_EXPERT = "shared_expert " + "/".join(MLP)


def _never(module: str) -> bool:
    return False


def _quantized(modules: list[str], skips: Callable[[str], bool]) -> bool:
    """Whether the checkpoint quantizes one of `modules` (checkpoint module names) at least."""
    return not all(skips(module) for module in modules)


def _split(part: str, key: str, width: int, tp_size: int) -> dict[str, list[int]]:
    """An MLP `width` wide (config.json `key`; `part`: "" for the dense MLP, "shared_expert ") split over `tp_size`:
    each rank's rows of gate/up and columns of down; at TP 1 the row where up starts in the fused gate/up weight. A
    width TP does not divide is left to the TP rules (model/tp_split.py)."""
    if width % tp_size:
        return {}
    if tp_size == 1:
        return {f"{part}gate_proj/up_proj (config.json {key} {width})": [width]}
    return {f"{part}{'/'.join(MLP)} (config.json {key} {width}: {width // tp_size} a rank)": [width // tp_size]}


def block_misaligned(arch: ModelArch, tp_size: int, skips: Callable[[str], bool] = _never) -> list[str]:
    """The projections (with their config.json width) whose TP shards at `tp_size`, or whose start in a fused q/k/v or
    gate/up weight, would not fall on a 128 edge with block FP8 weights; `skips`: the checkpoint modules kept
    unquantized (QuantConfig.skips). Heads, and widths, that TP does not divide are left to the TP rules (their
    shards are not defined); the other projections are still checked, so that every problem is named at once."""
    moe, layers, head_dim = arch.moe, range(arch.num_layers), arch.head_dim
    heads_split = not (arch.num_heads % tp_size or (arch.num_kv_heads % tp_size and tp_size % arch.num_kv_heads))
    sizes: dict[str, list[int]] = {}
    if heads_split and _quantized([f"model.layers.{i}.self_attn.{p}" for i in layers
                                   for p in ("q_proj", "k_proj", "v_proj")], skips):
        kv_starts = {r * arch.num_kv_heads // tp_size * head_dim for r in range(tp_size)}
        sizes["q_proj"] = [arch.num_heads // tp_size * head_dim]
        sizes["k_proj/v_proj"] = [max(1, arch.num_kv_heads // tp_size) * head_dim, *kv_starts]
    if heads_split and tp_size > 1 and _quantized([f"model.layers.{i}.self_attn.o_proj" for i in layers], skips):
        sizes["o_proj (input)"] = [arch.num_heads * head_dim // tp_size]
    dense = [i for i in layers if moe is None or not moe.is_sparse(i)]
    if _quantized([f"model.layers.{i}.mlp.{p}" for i in dense for p in MLP], skips):
        sizes.update(_split("", "intermediate_size", arch.intermediate_size, tp_size))
    shared = moe.shared_expert_intermediate_size if moe is not None else None
    sparse = [i for i in layers if i not in dense]
    if shared and _quantized([f"model.layers.{i}.mlp.shared_expert.{p}" for i in sparse for p in MLP], skips):
        sizes.update(_split("shared_expert ", "shared_expert_intermediate_size", shared, tp_size))
    return [name for name, values in sizes.items() if any(v % BLOCK for v in values)]


def block_tp_rule(arch: ModelArch, quant: QuantConfig | None) -> TPRule | None:
    """The TP rule of a block-FP8 checkpoint: one problem for the projections a TP size cuts off the scale blocks.
    None for other checkpoints, and for one misaligned at TP 1 already (k, v or up starts mid-block in its fused
    weight): that one is refused at every TP size, once, as the checkpoint's problem (check-config's weight check,
    the load's `_check_block_edges`), and "use a TP size ..." would send the user after sizes that cannot help."""
    if quant is None or quant.scheme != "block" or block_misaligned(arch, 1, quant.skips):
        return None
    skips = quant.skips

    def rule(tp_size: int, expert_parallel: bool) -> list[SplitProblem]:
        bad = block_misaligned(arch, tp_size, skips)
        if not bad:
            return []
        what = f"TP {tp_size} splits the block-FP8 projections {', '.join(bad)} off the {BLOCK}-wide scale blocks"
        if expert_parallel and any(name.startswith(SHARED_EXPERT) for name in bad):
            what += " (expert parallel places whole routed experts but splits the shared expert by TP)"
        return [SplitProblem(what, f"use a TP size whose shards are whole {BLOCK}-row blocks (or a per-channel FP8 "
                                   "checkpoint, or the unquantized checkpoint with --quantization fp8)")]

    return rule
