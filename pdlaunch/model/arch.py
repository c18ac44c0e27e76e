"""Parse a HF config.json into `ModelArch`: the shapes and options the Llama-family model needs.

Accepts both config dialects: transformers 4.x (`rope_theta` + `rope_scaling`, `torch_dtype`) and
5.x (`rope_parameters`, `dtype`). Per-layer attention types follow HF's own derivation rules
(model/families.py); rope keys are read by model/rope_config.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.config_sizes import config_sizes
from pdlaunch.model.families import HF_DEFAULTS, FamilyDefaults, LayerType, architecture_of, layer_types
from pdlaunch.model.moe.config import DENSE_FAMILY, MOE_ARCHITECTURES, MoeArch, config_bool, config_int, parse_moe
from pdlaunch.model.rope_config import RopeScaling, positive_float, rope
from pdlaunch.model.weight_files import gguf_hint


class HFConfigJson(TypedDict, total=False):
    """The config.json keys of the checkpoints pdlaunch writes itself (`--model tiny`, the demo model's
    expected config, `bench make-checkpoint` shapes); config.json files read from disk stay plain JSON."""

    architectures: list[str]
    model_type: str
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_local_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: list[int]
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, float | str] | None
    rope_parameters: dict[str, float | str]
    hidden_act: str
    attention_bias: bool
    attention_dropout: float
    mlp_bias: bool
    initializer_range: float
    tie_word_embeddings: bool
    use_cache: bool
    use_sliding_window: bool
    sliding_window: int | None
    router_aux_loss_coef: float
    output_router_logits: bool
    torch_dtype: str
    dtype: str
    bos_token_id: int
    eos_token_id: int
    quantization_config: dict[str, JsonValue]


@dataclass(frozen=True)
class KVCacheGroup:
    """Layers that share one KV cache tensor and one block table (same attention type)."""

    layers: list[int]
    sliding_window: int | None


class ModelArch(BaseModel):
    model_config = ConfigDict(frozen=True)

    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    rope_theta: float
    rope_scaling: RopeScaling | None = None  # None: plain rope
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each q and k head, before rotary
    # OLMoE: RMSNorm over the whole q and k projection width (all heads at once), before rotary
    qk_norm_full_width: bool = False
    o_proj_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    layer_types: list[LayerType]
    max_position_embeddings: int
    torch_dtype: str
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    moe: MoeArch | None = None  # Mixture-of-Experts models: the experts (model/moe/config.py)

    def kv_cache_groups(self) -> list[KVCacheGroup]:
        """One group per attention type, in order of first appearance (plain model: one group)."""
        groups: dict[int | None, list[int]] = {}
        for layer, window in enumerate(self.layer_windows()):
            groups.setdefault(window, []).append(layer)
        return [KVCacheGroup(layers=layers, sliding_window=window) for window, layers in groups.items()]

    def layer_windows(self) -> list[int | None]:
        """Per layer: its sliding window in tokens, or None for full attention."""
        return [self.sliding_window if t == "sliding_attention" else None for t in self.layer_types]

    def layer_group_index(self) -> list[tuple[int, int]]:
        """Per layer: (KV cache group index, index of the layer inside that group)."""
        where: list[tuple[int, int]] = [(0, 0)] * self.num_layers
        for g, group in enumerate(self.kv_cache_groups()):
            for i, layer in enumerate(group.layers):
                where[layer] = (g, i)
        return where


def _check_kv_heads(cfg: Mapping[str, object], heads: int, kv_heads: int, defaults: FamilyDefaults) -> None:
    """The KV heads divide the heads; a default that does not (config.json leaves num_key_value_heads out) is named
    as the default it is."""
    if not heads % kv_heads:
        return
    if "num_key_value_heads" not in cfg:
        raise PdlaunchError(
            f"config.json has no num_key_value_heads, so it is transformers' default for {defaults.model_type}, "
            f"{kv_heads}, which does not divide num_attention_heads {heads}", field="config.json:num_key_value_heads",
            hint="add the checkpoint's num_key_value_heads to config.json (k_proj's rows / head_dim)")
    raise PdlaunchError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}",
                        field="config.json:num_key_value_heads")


def parse_hf_config(cfg: dict[str, Any], source: str = "config.json") -> ModelArch:
    """A config.json dict -> ModelArch (PdlaunchError for unsupported or inconsistent configs). A key it omits is
    what transformers' config class of its architecture gives (HF_DEFAULTS); `source` names the file in errors."""
    architecture = architecture_of(cfg, source)
    defaults = HF_DEFAULTS[architecture]
    size = config_sizes(cfg, defaults, source)  # check-config's reading and words (model/config_sizes.py)
    heads, layers, kv_heads = size.num_attention_heads, size.num_hidden_layers, size.num_key_value_heads
    _check_kv_heads(cfg, heads, kv_heads, defaults)
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' ACT2FN: "swish" is SiLU
        raise PdlaunchError(f"hidden_act {act!r} is not supported (only silu)", field="config.json:hidden_act")
    theta, scaling = rope(cfg, defaults.rope_theta)
    # An MoE family parses its attention as the dense family it shares it with.
    family = DENSE_FAMILY.get(architecture, architecture)
    window, types = layer_types(cfg, architecture, layers, defaults.sliding_window)
    is_qwen2 = family == "Qwen2ForCausalLM"
    llama_bias = not is_qwen2 and config_bool(cfg, "attention_bias")
    qkv_bias = is_qwen2 and config_bool(cfg, "qkv_bias", True)  # Qwen2-MoE spells it qkv_bias
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    max_pos = cfg.get("max_position_embeddings")
    fields = {
        "architecture": architecture,
        "model_type": str(cfg.get("model_type", "")),
        "hidden_size": size.hidden_size,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": size.head_dim,
        "vocab_size": size.vocab_size,
        "intermediate_size": size.intermediate_size,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rms_norm_eps": positive_float(cfg.get("rms_norm_eps"), "rms_norm_eps", defaults.rms_norm_eps),
        "tie_word_embeddings": config_bool(cfg, "tie_word_embeddings"),
        "attention_bias": qkv_bias or llama_bias,
        "qk_norm": family == "Qwen3ForCausalLM",
        "qk_norm_full_width": architecture == "OlmoeForCausalLM",
        "o_proj_bias": llama_bias,
        "mlp_bias": config_bool(cfg, "mlp_bias"),
        "sliding_window": window,
        "layer_types": types,
        "max_position_embeddings": defaults.max_position_embeddings if max_pos is None
        else config_int(cfg, "max_position_embeddings"),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "moe": parse_moe(cfg, architecture, layers) if architecture in MOE_ARCHITECTURES else None,
    }
    try:
        return ModelArch.model_validate(fields)
    except ValidationError as exc:  # what config.json gives as it is (bos_token_id, eos_token_id)
        error = exc.errors()[0]
        key = str(error["loc"][0])
        raise PdlaunchError(f"{key} {error['input']!r} is not valid ({error['msg']})", field=f"config.json:{key}",
                            hint="use the checkpoint's original config.json") from None


def load_arch(directory: Path) -> ModelArch:
    """Read `directory/config.json` (clear errors when it is missing or not JSON)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise PdlaunchError(
            f"{path} is missing",
            field="model.path",
            hint=gguf_hint(Path(directory)) or "a checkpoint directory needs config.json, *.safetensors and "
                                               "tokenizer.json",
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PdlaunchError(f"cannot read {path}: {exc}", field="model.path") from exc
    if not isinstance(cfg, dict):  # a list or a string was an AttributeError traceback
        raise PdlaunchError(f"{path} holds a JSON {type(cfg).__name__}, not an object", field="model.path",
                            hint="restore the checkpoint's config.json")
    return parse_hf_config(cfg, str(path))
