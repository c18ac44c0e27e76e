"""`MoeArch`: what a Mixture-of-Experts config.json says about its experts, per supported family.

Every supported family routes the same way (softmax over all experts in float32, top-k, optionally
renormalised over the k picked) and differs only in configuration: which layers are sparse, the
expert width's key, a shared expert (Qwen2-MoE), and the checkpoint's naming (Mixtral's
`block_sparse_moe.experts.{e}.w1/w2/w3`). The attention of each MoE family is a dense family's
(`DENSE_FAMILY`), which model/arch.py parses as it parses that family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pdlaunch.errors import PdlaunchError

# MoE architecture -> the dense architecture whose attention (and config rules) it shares.
DENSE_FAMILY = {
    "Qwen3MoeForCausalLM": "Qwen3ForCausalLM",
    "Qwen2MoeForCausalLM": "Qwen2ForCausalLM",
    "MixtralForCausalLM": "MistralForCausalLM",
    "OlmoeForCausalLM": "LlamaForCausalLM",
}
MOE_ARCHITECTURES = tuple(DENSE_FAMILY)

CheckpointStyle = Literal["mlp", "block_sparse_moe"]


class MoeArch(BaseModel):
    """The expert layout of an MoE model (sizes are the checkpoint's, unsharded)."""

    model_config = ConfigDict(frozen=True)

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    norm_topk_prob: bool  # renormalise the k picked probabilities to sum to 1
    sparse_layers: list[bool]  # per layer: MoE block (True) or the dense MLP (False)
    shared_expert_intermediate_size: int | None = None  # Qwen2-MoE: a gated dense expert every token uses
    # "mlp": `mlp.gate`, `mlp.experts.{e}.gate_proj/up_proj/down_proj`;
    # "block_sparse_moe" (Mixtral): `block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1/w3/w2`.
    checkpoint_style: CheckpointStyle = "mlp"
    # the config.json key of expert_intermediate_size (Mixtral's and OLMoE's experts take intermediate_size), for
    # messages about an expert's shape
    intermediate_key: str = "moe_intermediate_size"

    def is_sparse(self, layer: int) -> bool:
        return self.sparse_layers[layer]


_HINT = "use the checkpoint's original config.json"


def config_int(cfg: Mapping[str, object], *keys: str, minimum: int = 1) -> int:
    """The first of `keys` that config.json sets, a JSON integer of at least `minimum` (transformers refuses a
    string, a float or a boolean there too). Also read by model/arch.py for the keys every family has."""
    for key in keys:
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise PdlaunchError(f"{key} {value!r} is not an integer", field=f"config.json:{key}", hint=_HINT)
        if value < minimum:
            raise PdlaunchError(f"{key} {value} must be at least {minimum}", field=f"config.json:{key}", hint=_HINT)
        return value
    raise PdlaunchError(f"config.json lacks {keys[0]!r}", field=f"config.json:{keys[0]}")


def config_bool(cfg: Mapping[str, object], key: str, default: bool = False) -> bool:
    """A JSON true/false (absent or null: `default`, transformers' own): bool("false") would be True."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise PdlaunchError(f"{key} {value!r} is not true or false", field=f"config.json:{key}",
                            hint="write it as a JSON boolean, without quotes")
    return value


def _dense_layers(cfg: Mapping[str, object], num_layers: int) -> set[int]:
    """mlp_only_layers: indices of layers that keep the dense MLP, each one of the model's layers."""
    value = cfg.get("mlp_only_layers")
    if value is None:
        return set()
    field = "config.json:mlp_only_layers"
    if not isinstance(value, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in value):
        raise PdlaunchError(f"mlp_only_layers {value!r} is not a list of layer indices", field=field, hint=_HINT)
    outside = [i for i in value if not 0 <= i < num_layers]
    if outside:
        raise PdlaunchError(f"mlp_only_layers lists layer {outside[0]}, but the model's layers are 0 to "
                            f"{num_layers - 1}", field=field, hint=_HINT)
    return set(value)


def parse_moe(cfg: dict[str, Any], architecture: str, num_layers: int) -> MoeArch:
    """The MoE part of a config.json of one of `MOE_ARCHITECTURES` (PdlaunchError naming the key)."""
    # Mixtral names its experts num_local_experts: a config.json without either is told that key
    names = ("num_local_experts", "num_experts") if architecture == "MixtralForCausalLM" else \
        ("num_experts", "num_local_experts")
    experts = config_int(cfg, *names)
    top_k = config_int(cfg, "num_experts_per_tok")
    if top_k > experts:
        raise PdlaunchError(f"num_experts_per_tok {top_k} must be between 1 and the {experts} experts",
                            field="config.json:num_experts_per_tok")
    if architecture == "MixtralForCausalLM":
        return MoeArch(num_experts=experts, top_k=top_k, expert_intermediate_size=config_int(cfg, "intermediate_size"),
                       norm_topk_prob=True, sparse_layers=[True] * num_layers, checkpoint_style="block_sparse_moe",
                       intermediate_key="intermediate_size")
    if architecture == "OlmoeForCausalLM":
        if cfg.get("clip_qkv") is not None:
            raise PdlaunchError("OLMoE with clip_qkv is not supported", field="config.json:clip_qkv",
                                hint="only checkpoints with clip_qkv null load")
        return MoeArch(num_experts=experts, top_k=top_k, expert_intermediate_size=config_int(cfg, "intermediate_size"),
                       norm_topk_prob=config_bool(cfg, "norm_topk_prob"), sparse_layers=[True] * num_layers,
                       intermediate_key="intermediate_size")
    # Qwen2-MoE / Qwen3-MoE: a layer is sparse unless listed in mlp_only_layers, every
    # decoder_sparse_step-th layer (1-based), as their decoder layers choose.
    step = config_int(cfg, "decoder_sparse_step") if cfg.get("decoder_sparse_step") is not None else 1
    dense_only = _dense_layers(cfg, num_layers)
    sparse = [i not in dense_only and (i + 1) % step == 0 for i in range(num_layers)]
    shared = None
    if architecture == "Qwen2MoeForCausalLM":
        # Required (transformers would assume 5632); 0 is no shared expert: a zero-width one adds nothing.
        shared = config_int(cfg, "shared_expert_intermediate_size", minimum=0) or None
    return MoeArch(num_experts=experts, top_k=top_k, expert_intermediate_size=config_int(cfg, "moe_intermediate_size"),
                   norm_topk_prob=config_bool(cfg, "norm_topk_prob"), sparse_layers=sparse,
                   shared_expert_intermediate_size=shared)
