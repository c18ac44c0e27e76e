"""The architectures pdlaunch runs and what each family's config class implies: `architecture_of` (config.json's
`architectures`, refused with the supported list), transformers' defaults per family (`HF_DEFAULTS`) and where a
family's sliding window lies (`layer_types`, by HF's own derivation rules).

Torch-free (only pydantic and json below it): config/model_info.py reads it when checking a deployment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.moe.config import DENSE_FAMILY, MOE_ARCHITECTURES, config_bool, config_int

DENSE_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
SUPPORTED_ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES
# Families whose sliding window is switched on by `use_sliding_window` and placed by
# `layer_types` (or, when absent, on every layer from `max_window_layers` on).
_WINDOW_BY_LAYER_TYPES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")

LayerType = Literal["full_attention", "sliding_attention"]


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


def layer_types(cfg: Mapping[str, object], architecture: str, num_layers: int,
                default_window: int | None) -> tuple[int | None, list[LayerType]]:
    """(sliding_window, layer_types) as HF derives them for each architecture; `default_window` when config.json
    has no sliding_window key (null is no window)."""
    family = DENSE_FAMILY.get(architecture, architecture)  # an MoE family's switch is its dense family's
    unused = family == "LlamaForCausalLM" or (family in _WINDOW_BY_LAYER_TYPES
                                              and not config_bool(cfg, "use_sliding_window"))
    given = cfg["sliding_window"] if "sliding_window" in cfg else default_window
    if unused or given is None:  # unused, it may be anything (Qwen2-MoE's is 0)
        return None, ["full_attention"] * num_layers
    window = config_int(cfg, "sliding_window") if "sliding_window" in cfg else default_window
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
