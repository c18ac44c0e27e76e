"""Malformed Mixture-of-Experts checkpoints are refused with the config.json key or the tensor that is wrong, by
check-config and by `pdlaunch generate` alike (exit 1, no traceback), never loaded into a silently different model.
Well-formed values that transformers accepts stay accepted."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import parse_hf_config
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from tests.config.cli_helpers import check, invoke

QWEN3_MOE: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 512, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "head_dim": 32,
}
QWEN2_MOE = {**QWEN3_MOE, "architectures": ["Qwen2MoeForCausalLM"], "shared_expert_intermediate_size": 64}
MIXTRAL = {**{k: v for k, v in QWEN3_MOE.items() if k != "num_experts"}, "architectures": ["MixtralForCausalLM"],
           "num_local_experts": 8}
OLMOE = {**QWEN3_MOE, "architectures": ["OlmoeForCausalLM"]}


@pytest.mark.parametrize("base,change,key,text", [
    (QWEN3_MOE, {"num_experts": 0}, "num_experts", "num_experts 0 must be at least 1"),
    (QWEN3_MOE, {"num_experts": -1}, "num_experts", "must be at least 1"),
    (QWEN3_MOE, {"num_experts": "8"}, "num_experts", "'8' is not an integer"),
    (QWEN3_MOE, {"num_experts": 7.5}, "num_experts", "7.5 is not an integer"),  # int() would make it 7
    (QWEN3_MOE, {"num_experts": True}, "num_experts", "is not an integer"),
    (MIXTRAL, {"num_local_experts": "x"}, "num_local_experts", "'x' is not an integer"),
    (MIXTRAL, {"num_local_experts": 0}, "num_local_experts", "must be at least 1"),
    (QWEN3_MOE, {"num_experts_per_tok": 0}, "num_experts_per_tok", "must be at least 1"),
    (QWEN3_MOE, {"num_experts_per_tok": "2"}, "num_experts_per_tok", "is not an integer"),
    (QWEN3_MOE, {"norm_topk_prob": "false"}, "norm_topk_prob", "'false' is not true or false"),  # bool() -> True
    (QWEN3_MOE, {"norm_topk_prob": 1}, "norm_topk_prob", "is not true or false"),
    (OLMOE, {"norm_topk_prob": "yes"}, "norm_topk_prob", "is not true or false"),
    (QWEN3_MOE, {"moe_intermediate_size": 0}, "moe_intermediate_size", "must be at least 1"),
    (QWEN3_MOE, {"moe_intermediate_size": -32}, "moe_intermediate_size", "must be at least 1"),
    (QWEN3_MOE, {"decoder_sparse_step": 0}, "decoder_sparse_step", "must be at least 1"),  # was read as 1
    (QWEN3_MOE, {"decoder_sparse_step": -1}, "decoder_sparse_step", "must be at least 1"),  # was: every layer
    (QWEN3_MOE, {"decoder_sparse_step": "x"}, "decoder_sparse_step", "is not an integer"),
    (QWEN3_MOE, {"mlp_only_layers": [4]}, "mlp_only_layers", "lists layer 4, but the model's layers are 0 to 3"),
    (QWEN3_MOE, {"mlp_only_layers": [-1]}, "mlp_only_layers", "lists layer -1"),
    (QWEN3_MOE, {"mlp_only_layers": 1}, "mlp_only_layers", "is not a list of layer indices"),
    (QWEN3_MOE, {"mlp_only_layers": "13"}, "mlp_only_layers", "is not a list"),  # was: layers 1 and 3
    (QWEN3_MOE, {"mlp_only_layers": ["a"]}, "mlp_only_layers", "is not a list"),
    (QWEN2_MOE, {"shared_expert_intermediate_size": None}, "shared_expert_intermediate_size", "lacks"),
    # Mixtral's key: the message named Qwen's num_experts, which a Mixtral config.json never has
    (MIXTRAL, {"num_local_experts": None}, "num_local_experts", "config.json lacks 'num_local_experts'"),
    (QWEN3_MOE, {"num_experts": None}, "num_experts", "config.json lacks 'num_experts'"),
    (QWEN2_MOE, {"shared_expert_intermediate_size": -1}, "shared_expert_intermediate_size", "at least 0"),
    (QWEN2_MOE, {"shared_expert_intermediate_size": "x"}, "shared_expert_intermediate_size", "not an integer"),
])
def test_a_bad_moe_config_value_is_refused_with_its_key(base: dict[str, Any], change: dict[str, Any], key: str,
                                                        text: str) -> None:
    with pytest.raises(PdlaunchError) as err:
        parse_hf_config({k: v for k, v in {**base, **change}.items() if v is not None})
    assert err.value.field == f"config.json:{key}" and text in err.value.message


@pytest.mark.parametrize("base,change,key,text", [
    # read with bool(): "false" was true (a tied lm_head, biases, a sliding window the model does not have)
    (QWEN3_MOE, {"tie_word_embeddings": "false"}, "tie_word_embeddings", "'false' is not true or false"),
    (OLMOE, {"attention_bias": "false"}, "attention_bias", "is not true or false"),
    (QWEN2_MOE, {"qkv_bias": "false"}, "qkv_bias", "is not true or false"),
    (QWEN3_MOE, {"use_sliding_window": "false", "sliding_window": 8}, "use_sliding_window", "is not true or false"),
    (QWEN3_MOE, {"mlp_bias": 0}, "mlp_bias", "is not true or false"),
    # tracebacks (ValueError, pydantic ValidationError) or a negative epsilon under the square root
    (QWEN3_MOE, {"rms_norm_eps": "x"}, "rms_norm_eps", "'x' is not a positive number"),
    (QWEN3_MOE, {"rms_norm_eps": -1e-6}, "rms_norm_eps", "is not a positive number"),
    (QWEN3_MOE, {"rope_theta": 0}, "rope_theta", "0 is not a positive number"),
    (QWEN3_MOE, {"max_position_embeddings": "x"}, "max_position_embeddings", "'x' is not an integer"),
    (MIXTRAL, {"sliding_window": "x"}, "sliding_window", "'x' is not an integer"),
    (MIXTRAL, {"sliding_window": 0}, "sliding_window", "must be at least 1"),
    (QWEN3_MOE, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": "x"}, "max_window_layers",
     "is not an integer"),
    (QWEN3_MOE, {"eos_token_id": "x"}, "eos_token_id", "'x' is not valid"),
])
def test_a_bad_attention_config_value_of_an_moe_model_is_refused(base: dict[str, Any], change: dict[str, Any],
                                                                 key: str, text: str) -> None:
    with pytest.raises(PdlaunchError) as err:
        parse_hf_config({**base, **change})
    assert err.value.field == f"config.json:{key}" and text in err.value.message


def test_values_transformers_accepts_stay_accepted() -> None:
    # Qwen2-MoE as transformers saves it: an unused sliding window of 0
    assert parse_hf_config({**QWEN2_MOE, "use_sliding_window": False, "sliding_window": 0}).sliding_window is None
    assert parse_hf_config({**QWEN3_MOE, "eos_token_id": [1, 2], "rms_norm_eps": 1e-6}).eos_token_id == [1, 2]
    moe = parse_hf_config({**QWEN3_MOE, "norm_topk_prob": None, "mlp_only_layers": None,
                           "decoder_sparse_step": None}).moe
    assert moe is not None and not moe.norm_topk_prob and all(moe.sparse_layers)
    moe = parse_hf_config({**QWEN3_MOE, "norm_topk_prob": True, "mlp_only_layers": [0, 3]}).moe
    assert moe is not None and moe.norm_topk_prob and moe.sparse_layers == [False, True, True, False]
    # a zero-width shared expert adds nothing: the model is the one without it
    no_shared = parse_hf_config({**QWEN2_MOE, "shared_expert_intermediate_size": 0}).moe
    assert no_shared is not None and no_shared.shared_expert_intermediate_size is None


def _copy(moe_ckpt: Callable[[str], Path], kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(moe_ckpt(kind), tmp_path / kind))


def _edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


def _cli_errors(path: Path) -> list[str]:
    """check-config's and generate's output, each exit 1 without a traceback (`invoke` asserts that)."""
    outputs = []
    for args in (["check-config"], ["generate", "--prompt", "hi", "--max-tokens", "4"]):
        result = invoke([*args, "--model", str(path), "--device", "cpu"])
        assert result.exit_code == 1, result.output
        outputs.append(" ".join(result.output.split()))
    return outputs


@pytest.mark.parametrize("changes,text", [
    ({"norm_topk_prob": "false"}, "norm_topk_prob 'false' is not true or false"),
    ({"mlp_only_layers": 1}, "mlp_only_layers 1 is not a list of layer indices"),  # was a TypeError traceback
    ({"num_experts": "four"}, "num_experts 'four' is not an integer"),  # was a ValueError traceback
])
def test_check_config_and_generate_refuse_a_bad_moe_config(changes: dict[str, object], text: str,
                                                           moe_ckpt: Callable[[str], Path], tmp_path: Path) -> None:
    path = _copy(moe_ckpt, "qwen3_moe", tmp_path)
    _edit_config(path, **changes)
    for output in _cli_errors(path):
        assert f"--model: {path / 'config.json'}: {text}" in output


def test_a_mixtral_config_without_its_experts_names_mixtrals_key(moe_ckpt: Callable[[str], Path],
                                                                 tmp_path: Path) -> None:
    """It read "config.json: config.json lacks 'num_experts'": Qwen's key, and config.json twice."""
    path = _copy(moe_ckpt, "mixtral", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["num_local_experts"]
    (path / "config.json").write_text(json.dumps(cfg))
    for output in _cli_errors(path):
        assert f"--model: {path / 'config.json'}: lacks 'num_local_experts'; use the checkpoint's original " \
            "config.json" in output


def _load_error(path: Path) -> str:
    with pytest.raises(PdlaunchError) as err:
        load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)
    return str(err.value)


@pytest.mark.parametrize("kind,original,copy", [
    # Qwen's name for a Mixtral expert: both loaded into expert 0's gate rows, the later one winning
    ("mixtral", "model.layers.0.block_sparse_moe.experts.0.w1.weight", "model.layers.0.mlp.experts.0.gate_proj.weight"),
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.mlp.gate.weight"),
    ("qwen3_moe", "model.layers.0.mlp.experts.1.up_proj.weight", "model.layers.0.mlp.experts.01.up_proj.weight"),
    ("qwen3_moe", "model.layers.2.mlp.experts.3.down_proj.weight",
     "model.layers.2.block_sparse_moe.experts.3.w2.weight"),
])
def test_one_expert_weight_under_two_names_is_refused(kind: str, original: str, copy: str,
                                                      moe_ckpt: Callable[[str], Path], tmp_path: Path) -> None:
    path = _copy(moe_ckpt, kind, tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors[copy] = torch.zeros_like(tensors[original])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    checked = " ".join(check(["--model", str(path), "--device", "cpu"]).output.split())
    for text in (checked, _load_error(path)):
        assert "load into the same weight" in text and repr(original) in text and repr(copy) in text


def test_one_tensor_in_two_shards_is_refused(moe_ckpt: Callable[[str], Path], tmp_path: Path) -> None:
    path = _copy(moe_ckpt, "olmoe", tmp_path)
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    tensors = load_file(path / "model.safetensors")
    save_file({name: torch.zeros_like(tensors[name])}, path / "model-extra.safetensors", metadata={"format": "pt"})
    checked = " ".join(check(["--model", str(path), "--device", "cpu"]).output.split())
    for text in (checked, _load_error(path)):
        assert f"tensor {name!r} is in both model-extra.safetensors and model.safetensors" in text


@pytest.mark.parametrize("kind,key,name", [
    ("qwen3_moe", "moe_intermediate_size", "model.layers.0.mlp.experts.0.gate_proj.weight"),
    ("mixtral", "intermediate_size", "model.layers.0.block_sparse_moe.experts.0.w1.weight"),
])
def test_a_misshapen_expert_names_the_config_keys_its_shape_comes_from(kind: str, key: str, name: str,
                                                                       moe_ckpt: Callable[[str], Path],
                                                                       tmp_path: Path) -> None:
    """It said the model expects (16, 64) and that the checkpoint does not match its config.json, not which keys:
    Mixtral's expert width is intermediate_size, Qwen's moe_intermediate_size."""
    path = _copy(moe_ckpt, kind, tmp_path)
    _edit_config(path, **{key: 16})
    text = f"tensor {name!r} in model.safetensors: shape mismatch for expert 0 gate projection: checkpoint (32, 64), " \
           f"model expects (16, 64) from config.json hidden_size 64 and {key} 16"
    for output in _cli_errors(path):
        assert text in output
    assert f"from config.json hidden_size 64 and {key} 16" in _load_error(path)  # the load meets down_proj first
