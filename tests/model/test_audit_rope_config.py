"""Rope scaling values that rotary.py divides by, and rope parameters that are not a JSON object, are refused
naming the config.json key, by check-config and by `pdlaunch generate` alike (no traceback, no NaN rotation); a
top-level original_max_position_embeddings beside llama3 rope, and a rope_scaling beside rope_parameters, are read
as transformers reads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import parse_hf_config
from tests.config.cli_helpers import LLAMA_CONFIG, invoke
from tests.helpers.checkpoints import make_llama

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope,key,text", [
    ({"type": "linear", "factor": 0}, "rope_scaling", "factor 0: Input should be greater than 0"),
    ({"type": "linear", "factor": -2.0}, "rope_scaling", "factor -2.0"),
    ({"type": "linear", "factor": float("nan")}, "rope_scaling", "finite"),
    ({"type": "linear"}, "rope_scaling", "factor is missing"),
    ({**LLAMA3, "low_freq_factor": 0}, "rope_scaling", "low_freq_factor 0"),  # was a ZeroDivisionError at load
    ({**LLAMA3, "original_max_position_embeddings": -64}, "rope_scaling", "original_max_position_embeddings -64"),
    ([1, 2], "rope_scaling", "rope_scaling [1, 2] is not a JSON object"),  # was a TypeError
    ("linear", "rope_scaling", "is not a JSON object"),  # was a ValueError
])
def test_bad_rope_scaling_is_refused_with_its_key(rope: Any, key: str, text: str) -> None:
    with pytest.raises(PdlaunchError) as err:
        parse_hf_config({**LLAMA_CONFIG, "rope_scaling": rope})
    assert err.value.field == f"config.json:{key}" and text in err.value.message
    assert "Value error" not in err.value.message


def test_rope_parameters_that_are_not_an_object_are_refused() -> None:
    # was read as "no rope_parameters": a llama3-scaled model silently ran with plain rope
    with pytest.raises(PdlaunchError) as err:
        parse_hf_config({**LLAMA_CONFIG, "rope_parameters": "llama3"})
    assert err.value.field == "config.json:rope_parameters"


def test_rope_parameters_errors_name_rope_parameters() -> None:
    with pytest.raises(PdlaunchError) as err:
        parse_hf_config({**LLAMA_CONFIG, "rope_parameters": {**LLAMA3, "factor": 0}})
    assert err.value.field == "config.json:rope_parameters"
    with pytest.raises(PdlaunchError) as err:
        parse_hf_config({**LLAMA_CONFIG, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    assert err.value.field == "config.json:rope_parameters"


def test_valid_rope_scaling_still_parses() -> None:
    arch = parse_hf_config({**LLAMA_CONFIG, "rope_scaling": {**LLAMA3, "factor": 0.5}})
    assert arch.rope_scaling is not None and arch.rope_scaling.factor == 0.5


@pytest.mark.parametrize("command", ["check-config", "generate"])
def test_zero_low_freq_factor_is_a_model_error_in_the_cli(tmp_path: Path, command: str) -> None:
    model = make_llama(tmp_path / "llama")
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_parameters"]["low_freq_factor"] = 0
    (model / "config.json").write_text(json.dumps(cfg))
    extra = ["--prompt", "hi", "--max-tokens", "1"] if command == "generate" else []
    result = invoke([command, str(model), "--device", "cpu", *extra])
    assert result.exit_code == 1, result.output
    assert "low_freq_factor 0" in result.output and "config.json:rope_parameters" in result.output


@pytest.mark.parametrize("changes,key", [
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     "rope_parameters"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0, "partial_rotary_factor": 0.25}}, "rope_scaling"),
    ({"rope_parameters": {**LLAMA3, "partial_rotary_factor": 0.5}, "partial_rotary_factor": 1.0}, "rope_parameters"),
    ({"partial_rotary_factor": "half"}, "partial_rotary_factor"),
])
def test_a_partial_rotary_factor_is_refused_with_its_key(changes: dict[str, Any], key: str) -> None:
    """vLLM rotates only that fraction of each head for these families; rotary.py rotates all of it, so the
    model was served with other logits and no word of it."""
    with pytest.raises(PdlaunchError) as err:
        parse_hf_config({**LLAMA_CONFIG, **changes})
    assert err.value.field == f"config.json:{key}" and "partial_rotary_factor" in err.value.message


def test_a_whole_head_partial_rotary_factor_still_parses() -> None:
    arch = parse_hf_config({**LLAMA_CONFIG, "partial_rotary_factor": 1.0,
                            "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 1}})
    assert arch.rope_scaling is None


@pytest.mark.parametrize("command", ["check-config", "generate"])
def test_a_partial_rotary_factor_is_a_model_error_in_the_cli(tmp_path: Path, command: str) -> None:
    model = make_llama(tmp_path / "llama")
    cfg = json.loads((model / "config.json").read_text())
    cfg["partial_rotary_factor"] = 0.5
    (model / "config.json").write_text(json.dumps(cfg))
    extra = ["--prompt", "hi", "--max-tokens", "1"] if command == "generate" else []
    result = invoke([command, str(model), "--device", "cpu", *extra])
    assert result.exit_code == 1, result.output
    assert "partial_rotary_factor 0.5" in result.output and "config.json:partial_rotary_factor" in result.output


def test_a_top_level_original_context_is_the_llama3_one_as_in_transformers(tmp_path: Path) -> None:
    """transformers 5 takes config.json's top-level original_max_position_embeddings as llama3's old context; it
    was ignored here (max_position_embeddings instead: every position's rotation differed, no error)."""
    import torch

    from pdlaunch.model.checkpoint import load_checkpoint
    from pdlaunch.model.loader import load_model
    from tests.helpers.checkpoints import hf_logits
    from tests.model.paged_runner import PagedRunner

    model = make_llama(tmp_path / "llama")
    cfg = json.loads((model / "config.json").read_text())
    del cfg["rope_parameters"]["original_max_position_embeddings"]  # 64; max_position_embeddings is 512
    cfg["original_max_position_embeddings"] = 128
    (model / "config.json").write_text(json.dumps(cfg))
    ckpt = load_checkpoint(str(model))
    assert ckpt.arch.rope_scaling is not None and ckpt.arch.rope_scaling.original_max_position_embeddings == 128
    prompt = [507, 72, 366, 111, 44, 432, 108, 100, 33, 300, 301, 302, 303, 304, 305, 306]
    logits = PagedRunner(load_model(ckpt, torch.device("cpu"), torch.float32)).step({"s": prompt})["s"]
    torch.testing.assert_close(logits, hf_logits(model, prompt), atol=1e-4, rtol=1e-4)


def test_a_top_level_original_context_that_differs_from_the_rope_parameters_is_refused() -> None:
    """transformers 4.x read the rope parameters' value, 5.x the top-level one: which model is meant is unknown."""
    with pytest.raises(PdlaunchError) as err:
        parse_hf_config({**LLAMA_CONFIG, "rope_scaling": LLAMA3, "original_max_position_embeddings": 8192})
    assert err.value.field == "config.json:original_max_position_embeddings"
    assert "8192 at the top level" in err.value.message and "64 in rope_scaling" in err.value.message
    same = parse_hf_config({**LLAMA_CONFIG, "rope_scaling": LLAMA3, "original_max_position_embeddings": 64})
    assert same.rope_scaling is not None and same.rope_scaling.original_max_position_embeddings == 64
    plain = parse_hf_config({**LLAMA_CONFIG, "original_max_position_embeddings": 8192})  # no llama3: unused
    assert plain.rope_scaling is None


def test_a_rope_scaling_beside_rope_parameters_wins_as_in_transformers(tmp_path: Path) -> None:
    """A config.json transformers 5 wrote (rope_parameters) with a rope_scaling added, as Qwen's model cards say to
    add YaRN: transformers (5 and 4.x) reads rope_scaling; it was ignored here, so a YaRN config ran plain rope
    without the refusal YaRN gets, and a linear one ran unscaled."""
    import torch

    from pdlaunch.model.checkpoint import load_checkpoint
    from pdlaunch.model.loader import load_model
    from tests.helpers.checkpoints import hf_logits
    from tests.model.paged_runner import PagedRunner

    plain = {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(PdlaunchError) as err:
        parse_hf_config({**LLAMA_CONFIG, "rope_parameters": plain,
                         "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}})
    assert err.value.field == "config.json:rope_scaling" and "'yarn' is not supported" in err.value.message
    model = make_llama(tmp_path / "llama")  # rope_parameters: llama3
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "linear", "factor": 4.0}
    (model / "config.json").write_text(json.dumps(cfg))
    ckpt = load_checkpoint(str(model))
    assert ckpt.arch.rope_scaling is not None and ckpt.arch.rope_scaling.rope_type == "linear"
    prompt = [507, 72, 366, 111, 44, 432, 108, 100, 33, 300, 301, 302, 303, 304, 305, 306]
    logits = PagedRunner(load_model(ckpt, torch.device("cpu"), torch.float32)).step({"s": prompt})["s"]
    torch.testing.assert_close(logits, hf_logits(model, prompt), atol=1e-4, rtol=1e-4)


def test_flat_rope_parameters_without_a_rope_type_are_plain_rope() -> None:
    """transformers 5 reads a flat rope_parameters without rope_type as rope_type default (standardize_rope_params);
    it was refused as "per-layer rope_parameters", which only a dict nested under layer types is."""
    arch = parse_hf_config({**LLAMA_CONFIG, "rope_parameters": {"rope_theta": 1000000.0}})
    assert arch.rope_theta == 1000000.0 and arch.rope_scaling is None
    with pytest.raises(PdlaunchError, match="per-layer rope_parameters are not supported"):
        parse_hf_config({**LLAMA_CONFIG, "rope_parameters": {"full_attention": {"rope_type": "default"},
                                                              "sliding_attention": {"rope_type": "default"}}})
