"""What a TP size must divide for a model to split over it, read from config.json alone: check-config's TP rule
(config/rules/roles.py `tp_problems`, per instance group) and the load (model/loader.py `meta_model`, before any
layer is built) say the same words. Torch-free.

What tensor parallelism splits (model/parallel_linear.py, decoder_layer.py, moe/):
- the attention heads: TP divides num_attention_heads; the KV heads are split when TP divides them and replicated
  when TP is a multiple of them;
- the dense MLP (gate/up rows, down columns) of every layer that builds one: intermediate_size. Mixtral and OLMoE
  build none (their intermediate_size is the experts' width); a Qwen-MoE builds it in the layers of mlp_only_layers
  and off its decoder_sparse_step;
- the routed experts: each one's width without expert parallel, whole experts per rank with it (num_experts);
- Qwen2-MoE's shared expert: its width, with expert parallel too.
TP need not divide hidden_size (every rank holds whole hidden rows) nor vocab_size (the embedding and the LM head
pad the last rank's share: model/vocab_parallel.py).

A checkpoint may add a rule of its own (`TPRule`: a block-FP8 one's 128 edges, model/quant/block_tp.py). Every problem
of a TP size is reported at once, each hint naming the TP sizes that pass every rule: a user who fixed the first one
and retried would otherwise meet the next, or be sent to a TP size another rule refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from pdlaunch.errors import ConfigError
from pdlaunch.model.moe.config import MoeArch

# The families whose config.json names the expert width and count with other keys than Qwen-MoE's.
_EXPERT_WIDTH_KEY = {"MixtralForCausalLM": "intermediate_size", "OlmoeForCausalLM": "intermediate_size"}
_EXPERT_COUNT_KEY = {"MixtralForCausalLM": "num_local_experts"}


class SplitSizes(Protocol):
    """The config.json sizes TP splits: model/arch.py's ModelArch (the load) and config/model_info.py's ModelInfo
    (check-config) both have them."""

    @property
    def architecture(self) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def intermediate_size(self) -> int: ...
    @property
    def moe(self) -> MoeArch | None: ...


class SplitProblem(NamedTuple):
    """A size the TP size does not split: what (the TP size, the config.json key and its value) and how to fix it."""

    message: str
    hint: str


# A checkpoint's own rule: what a TP size (with expert parallel or not) breaks beyond the split rules. It finds nothing
# at TP 1: what breaks there breaks at every TP size, so it is the checkpoint's problem, reported as such.
TPRule = Callable[[int, bool], list[SplitProblem]]


def _not_divided(model: SplitSizes, tp: int, expert_parallel: bool) -> list[SplitProblem]:
    """Every size `tp` does not split, each with its own fix (tp_sizes adds the sizes that split them all)."""
    heads, kv_heads = model.num_heads, model.num_kv_heads
    found: list[SplitProblem] = []
    if heads % tp:
        found.append(SplitProblem(f"TP {tp} does not divide the model's {heads} attention heads (config.json "
                                  f"num_attention_heads {heads})", f"use a TP size that divides {heads}"))
    if tp % kv_heads and kv_heads % tp:
        found.append(SplitProblem(f"TP {tp} and the model's {kv_heads} KV heads do not divide each other "
                                  f"(config.json num_key_value_heads {kv_heads})",
                                  f"use a TP size that divides {kv_heads} or a multiple of it"))
    moe = model.moe
    sparse = [moe is not None and moe.is_sparse(i) for i in range(model.num_layers)]
    width = model.intermediate_size
    if not all(sparse) and width % tp:
        which = "the dense layers' MLP width" if moe is not None else "the MLP width"
        found.append(SplitProblem(f"TP {tp} does not divide {which} (config.json intermediate_size {width})",
                                  f"use a TP size that divides {width}"))
    if moe is None or not any(sparse):
        return found
    experts, expert_width = moe.num_experts, moe.expert_intermediate_size
    if expert_parallel and experts % tp:
        key = _EXPERT_COUNT_KEY.get(model.architecture, "num_experts")
        found.append(SplitProblem(f"expert parallel over TP {tp} needs the model's {experts} experts to divide by it "
                                  f"(config.json {key} {experts})", f"use a TP size that divides {experts}, or turn "
                                  "expert parallel off for this group (enable_expert_parallel: false)"))
    elif not expert_parallel and expert_width % tp:
        key = _EXPERT_WIDTH_KEY.get(model.architecture, "moe_intermediate_size")
        found.append(SplitProblem(f"TP {tp} does not divide the experts' intermediate size (config.json {key} "
                                  f"{expert_width})", f"use a TP size that divides {expert_width}, or "
                                  "--enable-expert-parallel to place whole experts per rank"))
    shared = moe.shared_expert_intermediate_size
    if shared and shared % tp:
        placed = " (expert parallel places whole routed experts but splits the shared expert by TP)" \
            if expert_parallel else ""
        found.append(SplitProblem(f"TP {tp} does not divide the shared expert's width (config.json "
                                  f"shared_expert_intermediate_size {shared}){placed}",
                                  f"use a TP size that divides {shared}"))
    return found


def _problems(model: SplitSizes, tp: int, expert_parallel: bool, rule: TPRule | None) -> list[SplitProblem]:
    return _not_divided(model, tp, expert_parallel) + (rule(tp, expert_parallel) if rule is not None else [])


def tp_sizes(model: SplitSizes, expert_parallel: bool, rule: TPRule | None = None) -> list[int]:
    """Every TP size the model splits over and `rule` allows (each divides the attention heads, so there are few).
    TP 1 always is one: it splits nothing, and a TPRule finds nothing there."""
    return [tp for tp in range(1, model.num_heads + 1)
            if model.num_heads % tp == 0 and not _problems(model, tp, expert_parallel, rule)]


def split_problems(model: SplitSizes, tp: int, expert_parallel: bool, rule: TPRule | None = None
                   ) -> list[SplitProblem]:
    """Everything `tp` does not split (`expert_parallel`: whole routed experts per rank), then what the checkpoint's
    `rule` refuses, each hint naming the TP sizes that pass them all; [] when `tp` passes."""
    found = _problems(model, tp, expert_parallel, rule)
    if not found:
        return []
    sizes = ", ".join(map(str, tp_sizes(model, expert_parallel, rule)))
    return [SplitProblem(p.message, f"{p.hint}; this model splits over TP {sizes}") for p in found]


def check_split(model: SplitSizes, tp: int, expert_parallel: bool, rule: TPRule | None = None) -> None:
    """The load's refusal of a TP size: every problem check-config names for it, in its words, in one ConfigError
    (one `parallel.tp` line each; a ValueError from a layer would reach the user as a traceback)."""
    found = split_problems(model, tp, expert_parallel, rule)
    if found:
        raise ConfigError([("parallel.tp", f"{p.message} ({p.hint})") for p in found])
