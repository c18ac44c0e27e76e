"""A config.json that leaves out num_key_value_heads, rms_norm_eps, rope_theta, max_position_embeddings or
sliding_window runs the model transformers' config class of its family builds from the same file: the installed
transformers is the reference, so a default that changes there fails here rather than drifting silently."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from pdlaunch.config.model_info import load_model_info
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import ModelArch, parse_hf_config
from pdlaunch.model.families import HF_DEFAULTS, SUPPORTED_ARCHITECTURES
from pdlaunch.model.moe.config import MOE_ARCHITECTURES

# 32 heads: every family's default KV head count (32, 16, 8, 4 or the head count) divides it
SHAPE = {"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 4, "vocab_size": 512,
         "intermediate_size": 128}
MOE = {"num_experts": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
       "shared_expert_intermediate_size": 64}


def _config(architecture: str, **extra: Any) -> dict[str, Any]:
    moe = MOE if architecture in MOE_ARCHITECTURES else {}
    return {"architectures": [architecture], **SHAPE, **moe, **extra}


def _transformers(architecture: str, cfg: dict[str, Any]) -> Any:
    """The config transformers reads from the same config.json (AutoConfig picks its class by model_type)."""
    fields = {k: v for k, v in cfg.items() if k != "architectures"}
    return AutoConfig.for_model(HF_DEFAULTS[architecture].model_type, **fields)


def _theta(hf: Any) -> float:
    params = getattr(hf, "rope_parameters", None)  # transformers 5; 4.x has rope_theta
    return float(params["rope_theta"] if params else hf.rope_theta)


def _windows(hf: Any) -> list[int | None]:
    """Per layer, the window transformers' attention uses: none where the config class has no sliding_window
    (Llama, OLMoE: the key is kept but unread), its layer_types where it has them, else the window on every layer
    (Mistral, Mixtral, Qwen3-MoE)."""
    declared = getattr(type(hf), "__dataclass_fields__", {})  # transformers 5 config classes are dataclasses
    if "sliding_window" not in declared:
        return [None] * hf.num_hidden_layers
    if "layer_types" not in declared:
        return [hf.sliding_window or None] * hf.num_hidden_layers
    return [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]


def test_every_supported_architecture_has_its_transformers_class() -> None:
    assert set(HF_DEFAULTS) == set(SUPPORTED_ARCHITECTURES)
    for architecture, defaults in HF_DEFAULTS.items():
        assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[defaults.model_type] == architecture


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_omitted_keys_take_the_family_default_of_transformers(architecture: str) -> None:
    cfg = _config(architecture)
    ours, hf = parse_hf_config(cfg), _transformers(architecture, cfg)
    assert ours.num_kv_heads == hf.num_key_value_heads
    assert ours.rms_norm_eps == hf.rms_norm_eps
    assert ours.rope_theta == _theta(hf)
    assert ours.max_position_embeddings == hf.max_position_embeddings
    assert ours.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert ours.layer_windows() == _windows(hf)


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
@pytest.mark.parametrize("window", [{"use_sliding_window": True}, {"use_sliding_window": True, "sliding_window": 8},
                                    {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3}])
def test_sliding_window_layers_are_transformers_own(architecture: str, window: dict[str, Any]) -> None:
    cfg = _config(architecture, num_key_value_heads=8, **window)
    assert parse_hf_config(cfg).layer_windows() == _windows(_transformers(architecture, cfg))


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_given_keys_win_over_the_defaults(architecture: str) -> None:
    given = {"num_key_value_heads": 2, "rms_norm_eps": 3e-5, "rope_theta": 5e5, "max_position_embeddings": 777}
    arch = parse_hf_config(_config(architecture, **given))
    assert (arch.num_kv_heads, arch.rms_norm_eps, arch.rope_theta, arch.max_position_embeddings) == (2, 3e-5, 5e5, 777)
    # null num_key_value_heads: one KV head per attention head, as the classes that accept null read it
    assert parse_hf_config(_config(architecture, num_key_value_heads=None)).num_kv_heads == 32


def test_swish_is_silu_and_another_activation_is_refused_naming_it() -> None:
    """transformers' ACT2FN maps "swish" to SiLU: such a config.json is the same model."""
    assert parse_hf_config(_config("LlamaForCausalLM", hidden_act="swish")).hidden_size == 4096
    with pytest.raises(PdlaunchError) as err:
        parse_hf_config(_config("LlamaForCausalLM", hidden_act="gelu"))
    assert err.value.field == "config.json:hidden_act" and "'gelu'" in err.value.message


def test_a_default_kv_head_count_that_cannot_fit_names_the_key_and_the_default() -> None:
    with pytest.raises(PdlaunchError) as err:
        parse_hf_config(_config("Qwen2ForCausalLM", num_attention_heads=28, hidden_size=3584))
    assert err.value.field == "config.json:num_key_value_heads"
    assert "transformers' default for qwen2, 32" in err.value.message and "28" in err.value.message


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_check_reads_the_same_defaults_as_the_loader(architecture: str, tmp_path: Any) -> None:
    """check-config's sizes (KV bytes per token, the context limit) come from the same defaults."""
    import json

    (tmp_path / "config.json").write_text(json.dumps(_config(architecture)))
    info, problems = load_model_info(str(tmp_path))
    assert info is not None, problems
    arch: ModelArch = parse_hf_config(_config(architecture))
    assert (info.num_kv_heads, info.head_dim, info.max_position_embeddings) == \
        (arch.num_kv_heads, arch.head_dim, arch.max_position_embeddings)
