"""Parse a HF config.json into `ModelArch`: the shapes and options the Llama-family model needs.

Accepts both config dialects: transformers 4.x (`rope_theta` + `rope_scaling`, `torch_dtype`) and
5.x (`rope_parameters`, `dtype`). Per-layer attention types follow HF's own derivation rules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypedDict

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from pdlaunch.errors import PdlaunchError, error_text
from pdlaunch.model.moe.config import DENSE_FAMILY, MOE_ARCHITECTURES, MoeArch, config_bool, config_int, parse_moe

DENSE_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
SUPPORTED_ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES
# Families whose sliding window is switched on by `use_sliding_window` and placed by
# `layer_types` (or, when absent, on every layer from `max_window_layers` on).
_WINDOW_BY_LAYER_TYPES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")


class FamilyDefaults(NamedTuple):
    """What transformers' config class of a family sets for a key config.json leaves out. A checkpoint's
    config.json often omits what equals its class's default, so another value here runs another model (an
    epsilon or a rope base off by 10x changes every logit without any error)."""

    model_type: str  # the config class, as AutoConfig.for_model names it
    num_key_value_heads: int | None  # None: as many as num_attention_heads
    head_dim: int | None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None  # the window when the family uses one and config.json gives no size


# transformers 5's defaults (tests/model/test_arch_hf_defaults.py compares each with the installed config classes).
HF_DEFAULTS = {
    "LlamaForCausalLM": FamilyDefaults("llama", None, None, 1e-6, 10000.0, 2048, None),
    "Qwen2ForCausalLM": FamilyDefaults("qwen2", 32, None, 1e-6, 10000.0, 32768, 4096),
    "Qwen3ForCausalLM": FamilyDefaults("qwen3", 32, 128, 1e-6, 10000.0, 32768, 4096),
    "MistralForCausalLM": FamilyDefaults("mistral", 8, None, 1e-6, 10000.0, 131072, 4096),
    "MixtralForCausalLM": FamilyDefaults("mixtral", 8, None, 1e-5, 1000000.0, 131072, None),
    "Qwen2MoeForCausalLM": FamilyDefaults("qwen2_moe", 16, None, 1e-6, 10000.0, 32768, 4096),
    "Qwen3MoeForCausalLM": FamilyDefaults("qwen3_moe", 4, None, 1e-6, 10000.0, 32768, 4096),
    "OlmoeForCausalLM": FamilyDefaults("olmoe", None, None, 1e-5, 10000.0, 4096, None),
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

LayerType = Literal["full_attention", "sliding_attention"]
# rotary.py divides by each of these: 0 made every position's rotation inf/NaN, a negative one nonsense
RopeFactor = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class RopeScaling(BaseModel):
    """Scaled rope as config.json gives it: `linear` (factor) or `llama3` (factor, low/high_freq_factor,
    original_max_position_embeddings, by default the model's max_position_embeddings)."""

    model_config = ConfigDict(frozen=True)

    rope_type: Literal["linear", "llama3"]
    factor: RopeFactor
    low_freq_factor: RopeFactor | None = None
    high_freq_factor: RopeFactor | None = None
    original_max_position_embeddings: RopeFactor | None = None

    @model_validator(mode="after")
    def _llama3_needs_its_factors(self) -> RopeScaling:
        if self.rope_type == "llama3" and (self.low_freq_factor is None or self.high_freq_factor is None):
            raise ValueError("llama3 rope scaling needs low_freq_factor and high_freq_factor")
        return self


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


def _rope(cfg: dict[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling dict or None) from either config dialect; `default_theta` where neither gives one."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_type" not in params and params:
        # Per-layer-type rope parameters (not used by the supported families).
        raise PdlaunchError("per-layer rope_parameters are not supported", field="config.json:rope_parameters")
    key = "rope_parameters" if params is not None else "rope_scaling"
    found = params if params is not None else cfg.get("rope_scaling") or {}
    if not isinstance(found, dict):  # a string or list was silently plain rope (rope_parameters) or a traceback
        raise PdlaunchError(f"{key} {found!r} is not a JSON object", field=f"config.json:{key}",
                            hint="use the checkpoint's original config.json")
    scaling = dict(found)
    theta = _positive_float(scaling.pop("rope_theta", cfg.get("rope_theta")), "rope_theta", default_theta)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise PdlaunchError(
            f"rope type {rope_type!r} is not supported",
            field=f"config.json:{key}",
            hint=f"supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}",
        )
    if rope_type == "default":
        return theta, None
    known = {k: v for k, v in scaling.items() if k in RopeScaling.model_fields}
    try:
        return theta, RopeScaling.model_validate({**known, "rope_type": rope_type})
    except ValidationError as exc:
        error = exc.errors()[0]
        what = error_text(error)
        if error["loc"]:  # the factor named, with its value unless it is absent
            what = f"{error['loc'][0]} is missing" if error["type"] == "missing" else \
                f"{error['loc'][0]} {error['input']!r}: {what}"
        raise PdlaunchError(f"rope scaling {rope_type!r}: {what}", field=f"config.json:{key}",
                            hint="the checkpoint's config.json rope parameters are incomplete or invalid") from None


def _positive_float(value: object, key: str, default: float) -> float:
    """A config.json number above 0 (absent or null: `default`)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise PdlaunchError(f"{key} {value!r} is not a positive number", field=f"config.json:{key}",
                            hint="use the checkpoint's original config.json")
    return float(value)


def _layer_types(cfg: dict[str, Any], architecture: str, num_layers: int,
                 default_window: int | None) -> tuple[int | None, list[LayerType]]:
    """(sliding_window, layer_types) as HF derives them for each architecture; `default_window` when config.json
    has no sliding_window key (null is no window)."""
    family = DENSE_FAMILY.get(architecture, architecture)  # an MoE family's switch is its dense family's
    unused = family == "LlamaForCausalLM" or (family in _WINDOW_BY_LAYER_TYPES
                                              and not config_bool(cfg, "use_sliding_window"))
    given = cfg["sliding_window"] if "sliding_window" in cfg else default_window
    if unused or given is None:  # unused, it may be anything (Qwen2-MoE's is 0)
        return None, ["full_attention"] * num_layers
    window = config_int(cfg, "sliding_window") if "sliding_window" in cfg else given
    if family == "MistralForCausalLM":
        return window, ["sliding_attention"] * num_layers
    first = config_int(cfg, "max_window_layers", minimum=0) if "max_window_layers" in cfg else 28
    if architecture == "Qwen3MoeForCausalLM":  # transformers' Qwen3-MoE reads neither key: every layer slides
        return window, ["sliding_attention"] * num_layers
    types = cfg.get("layer_types")
    if types is None:
        if architecture == "Qwen2MoeForCausalLM":  # every other layer below max_window_layers, from layer 0
            types = ["sliding_attention" if i % 2 == 0 and i < first else "full_attention" for i in range(num_layers)]
        else:  # Qwen2, Qwen3: every layer from max_window_layers on
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers or any(
            t not in ("full_attention", "sliding_attention") for t in types):
        raise PdlaunchError(
            f"layer_types must list full_attention/sliding_attention for each of {num_layers} layers",
            field="config.json:layer_types",
        )
    return window, list(types)


def architecture_of(cfg: Mapping[str, object], source: str = "config.json") -> str:
    """The model class config.json's `architectures` names, one pdlaunch runs; else a PdlaunchError saying what
    `source` (the file) holds there and which classes are supported (model_info.py says the same when checking)."""
    found = cfg.get("architectures")
    hint = 'write it as a list of the one class the weights are for, e.g. ["LlamaForCausalLM"]'
    if found is None:
        what = "has no `architectures` list"
    elif not isinstance(found, list):
        what = f"has architectures {found!r}, which is not a list"
    elif not found:
        what = "has an empty `architectures` list"
    elif not all(isinstance(name, str) for name in found):
        what = f"has architectures {found!r}, which holds something other than a class name"
    elif len(set(found)) > 1:
        what = f"has architectures {found!r}: several model classes, and pdlaunch runs a checkpoint as one"
        hint = "keep only the class the weights are for"
    elif found[0] not in SUPPORTED_ARCHITECTURES:
        what = f"has architecture {found[0]!r}, which pdlaunch cannot run"
        hint = "use a checkpoint of a supported architecture"
    else:
        return str(found[0])
    raise PdlaunchError(f"{source} {what}", field="config.json:architectures",
                        hint=f"{hint}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _kv_heads(cfg: Mapping[str, object], heads: int, defaults: FamilyDefaults) -> int:
    """num_key_value_heads: config.json's, else the family class's default (null: as many as the heads, as every
    class that accepts null reads it)."""
    if "num_key_value_heads" in cfg:
        return heads if cfg["num_key_value_heads"] is None else config_int(cfg, "num_key_value_heads")
    kv_heads = defaults.num_key_value_heads or heads
    if heads % kv_heads:
        raise PdlaunchError(
            f"config.json has no num_key_value_heads, so it is transformers' default for {defaults.model_type}, "
            f"{kv_heads}, which does not divide num_attention_heads {heads}", field="config.json:num_key_value_heads",
            hint="add the checkpoint's num_key_value_heads to config.json (k_proj's rows / head_dim)")
    return kv_heads


def parse_hf_config(cfg: dict[str, Any], source: str = "config.json") -> ModelArch:
    """A config.json dict -> ModelArch (PdlaunchError for unsupported or inconsistent configs). A key it omits is
    what transformers' config class of its architecture gives (HF_DEFAULTS); `source` names the file in errors."""
    architecture = architecture_of(cfg, source)
    defaults = HF_DEFAULTS[architecture]
    try:
        hidden, heads, layers = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
        kv_heads = _kv_heads(cfg, heads, defaults)
        head_dim = int(cfg.get("head_dim") or defaults.head_dim or hidden // heads)
        vocab, inter = int(cfg["vocab_size"]), int(cfg["intermediate_size"])
    except KeyError as exc:
        raise PdlaunchError(f"config.json lacks {exc.args[0]!r}", field=f"config.json:{exc.args[0]}") from exc
    if heads % kv_heads:
        raise PdlaunchError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}",
            field="config.json:num_key_value_heads",
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise PdlaunchError(f"hidden_act {act!r} is not supported (only silu)", field="config.json:hidden_act")
    theta, scaling = _rope(cfg, defaults.rope_theta)
    # An MoE family parses its attention as the dense family it shares it with.
    family = DENSE_FAMILY.get(architecture, architecture)
    window, types = _layer_types(cfg, architecture, layers, defaults.sliding_window)
    is_qwen2 = family == "Qwen2ForCausalLM"
    llama_bias = not is_qwen2 and config_bool(cfg, "attention_bias")
    qkv_bias = is_qwen2 and config_bool(cfg, "qkv_bias", True)  # Qwen2-MoE spells it qkv_bias
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    max_pos = cfg.get("max_position_embeddings")
    fields = {
        "architecture": architecture,
        "model_type": str(cfg.get("model_type", "")),
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "intermediate_size": inter,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rms_norm_eps": _positive_float(cfg.get("rms_norm_eps"), "rms_norm_eps", defaults.rms_norm_eps),
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
            hint="a checkpoint directory needs config.json, *.safetensors and tokenizer.json",
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PdlaunchError(f"cannot read {path}: {exc}", field="model.path") from exc
    if not isinstance(cfg, dict):  # a list or a string was an AttributeError traceback
        raise PdlaunchError(f"{path} holds a JSON {type(cfg).__name__}, not an object", field="model.path",
                            hint="restore the checkpoint's config.json")
    return parse_hf_config(cfg, str(path))
