"""Malformed FP8 checkpoints are refused with the quantization_config key or the scale tensor that is wrong, by
check-config and by the load alike (exit 1, no traceback), never computed with NaN or sign-flipped weights.
What real checkpoints hold (bfloat16 scales, `re:` ignore patterns, no fmt) stays accepted."""

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
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from pdlaunch.model.quant.config import parse_quant_config
from tests.config.cli_helpers import check, invoke
from tests.helpers.fp8_checkpoints import keep_in_model_dtype, make_fp8_qwen3

BLOCK: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                         "activation_scheme": "dynamic", "modules_to_not_convert": ["lm_head"]}
GROUP: dict[str, Any] = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                            "dynamic": False},
                         "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}
CHANNEL: dict[str, Any] = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                           "config_groups": {"group_0": GROUP}}


@pytest.mark.parametrize("cfg,key,text", [
    ("fp8", "", "quantization_config 'fp8' is not a JSON object"),
    ([BLOCK], "", "is not a JSON object"),
    ({**BLOCK, "weight_block_size": 128}, "weight_block_size", "weight_block_size 128 is not supported"),
    ({**BLOCK, "modules_to_not_convert": "lm_head"}, "modules_to_not_convert", "is not a list of module names"),
    ({**BLOCK, "modules_to_not_convert": 5}, "modules_to_not_convert", "is not a list of module names"),
    ({**BLOCK, "modules_to_not_convert": [1]}, "modules_to_not_convert", "is not a list of module names"),
    ({**BLOCK, "ignored_layers": {"lm_head": 1}}, "ignored_layers", "is not a list of module names"),
    ({**CHANNEL, "ignore": "lm_head"}, "ignore", "ignore 'lm_head' is not a list of module names"),
    ({**CHANNEL, "ignore": ["re:(["]}, "ignore", "ignore entry 're:([' is not a valid regular expression"),
    ({**CHANNEL, "config_groups": [GROUP]}, "config_groups", "is not a JSON object"),
    ({**CHANNEL, "config_groups": {"g": "x"}}, "config_groups.g", "config_groups.g 'x' is not a JSON object"),
    ({**CHANNEL, "config_groups": {"group_0": {**GROUP, "weights": "x"}}}, "config_groups.group_0.weights",
     "is not a JSON object"),
    ({**CHANNEL, "config_groups": {"group_0": {**GROUP, "input_activations": "x"}}},
     "config_groups.group_0.input_activations", "is not a JSON object"),
    ({**CHANNEL, "config_groups": {"group_0": {**GROUP, "targets": 5}}}, "config_groups.group_0.targets",
     "targets 5 are not supported"),
    ({**CHANNEL, "config_groups": {"group_0": {**GROUP, "weights": {**GROUP["weights"], "strategy": "block",
                                                                    "block_structure": 128}}}},
     "config_groups.group_0.weights.block_structure", "block_structure 128 is not supported"),
    # the KV cache's scales of an int8 scheme, applied as fp8 ones under --kv-cache-dtype fp8, were silently wrong
    ({**CHANNEL, "kv_cache_scheme": {"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False}},
     "kv_cache_scheme", "kv_cache_scheme quantizes the KV cache to int 8-bit; pdlaunch's FP8 KV cache"),
    ({**CHANNEL, "kv_cache_scheme": "fp8"}, "kv_cache_scheme", "kv_cache_scheme 'fp8' is not a JSON object"),
])
def test_a_malformed_quantization_config_is_refused_with_its_key(cfg: Any, key: str, text: str) -> None:
    """Each of these raised a TypeError/AttributeError/re.error/pydantic ValidationError, or (a string for a list)
    was read a character at a time."""
    with pytest.raises(PdlaunchError) as err:
        parse_quant_config(cfg)
    assert err.value.field == "config.json:quantization_config" + (f".{key}" if key else "")
    assert text in err.value.message


INT = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}


@pytest.mark.parametrize("cfg,key,text", [
    # W8A8 int8 (llm-compressor): the format is checkpoint-wide, and the error named config_groups.group_0.format,
    # a key the file does not have, without saying what the checkpoint is
    ({**CHANNEL, "format": "int-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": INT, "input_activations": {**INT, "strategy": "token", "dynamic": True}}}},
     "format", "format 'int-quantized' (int 8-bit weights, int 8-bit activations) is not supported"),
    ({**CHANNEL, "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {**INT, "num_bits": 4, "strategy": "group", "group_size": 128}}}},
     "format", "format 'pack-quantized' (int 4-bit weights) is not supported"),
    ({**CHANNEL, "config_groups": {"group_0": {**GROUP, "format": "naive-quantized"}}}, "config_groups.group_0.format",
     "format 'naive-quantized' (float 8-bit weights, float 8-bit activations) is not supported"),
    ({**CHANNEL, "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "dynamic": False}}}},
     "config_groups.group_0.weights", "weights must be static 8-bit float; the group quantizes float 4-bit weights"),
    # static input scales: refused as such (the message said so for a dynamic per-tensor scheme too, which loads)
    ({**CHANNEL, "config_groups": {"group_0": {**GROUP, "input_activations": {
        **GROUP["input_activations"], "strategy": "tensor", "dynamic": False}}}},
     "config_groups.group_0.input_activations.dynamic", "static input_activations (dynamic False: calibrated"),
    ({**CHANNEL, "config_groups": {"group_0": {**GROUP, "input_activations": {
        **GROUP["input_activations"], "strategy": "tensor_group", "group_size": 16}}}},
     "config_groups.group_0.input_activations.strategy",
     "input_activations strategy 'tensor_group' is not supported (token, group or tensor)"),
    ({**CHANNEL, "config_groups": {"group_0": {**GROUP, "input_activations": {
        **GROUP["input_activations"], "num_bits": 4}}}},
     "config_groups.group_0.input_activations", "input_activations quantize to float 4-bit"),
    # 2:4 sparse weights stored as values and a bitmask: accepted, then each such tensor refused as "unexpected"
    ({**CHANNEL, "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}},
     "sparsity_config.format", "sparsity_config format 'sparse-24-bitmask' is not supported"),
    ({**CHANNEL, "sparsity_config": "2:4"}, "sparsity_config", "is not a JSON object"),
])
def test_an_unsupported_compressed_tensors_scheme_is_named_with_the_key_that_says_it(cfg: Any, key: str,
                                                                                    text: str) -> None:
    with pytest.raises(PdlaunchError) as err:
        parse_quant_config(cfg)
    assert err.value.field == f"config.json:quantization_config.{key}" and text in err.value.message


def test_real_checkpoint_layouts_stay_accepted() -> None:
    qwen3_fp8 = parse_quant_config({**BLOCK, "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate"]})
    assert qwen3_fp8 is not None and qwen3_fp8.skips("model.layers.0.mlp.gate")
    no_fmt = parse_quant_config({k: v for k, v in BLOCK.items() if k not in ("fmt", "activation_scheme")})
    assert no_fmt is not None and no_fmt.scheme == "block"  # transformers' defaults: e4m3, dynamic
    shouting = parse_quant_config({**BLOCK, "activation_scheme": "Dynamic"})
    assert shouting is not None and shouting.scheme == "block"  # transformers lowercases the scheme
    dense_sparse = parse_quant_config({**CHANNEL, "sparsity_config": {"format": "dense", "sparsity_structure": "2:4"}})
    assert dense_sparse is not None and dense_sparse.scheme == "channel"  # 2:4 zeros in whole matrices: as they are
    fp8_kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    assert parse_quant_config({**CHANNEL, "kv_cache_scheme": fp8_kv}) is not None  # what --kv-cache-dtype fp8 reads
    # dynamic per-tensor input activations (vLLM serves them, quantized per token): as a per-token scheme
    per_tensor_acts = {**GROUP["input_activations"], "strategy": "tensor"}
    for weights in ("channel", "tensor"):
        group = {**GROUP, "weights": {**GROUP["weights"], "strategy": weights}, "input_activations": per_tensor_acts}
        found = parse_quant_config({**CHANNEL, "config_groups": {"group_0": group}})
        assert found is not None and found.scheme == weights
    red_hat = parse_quant_config({**CHANNEL, "ignore": ["lm_head", "re:.*mlp.gate$"], "kv_cache_scheme": None})
    assert red_hat is not None and red_hat.skips("model.layers.3.mlp.gate") and red_hat.scheme == "channel"


def test_an_ignore_pattern_matches_from_the_start_of_the_name_as_compressed_tensors_does(tmp_path: Path) -> None:
    """compressed-tensors (which quantized the checkpoint) and vLLM match a `re:` entry with re.match: `re:.*self_attn`
    kept every attention projection unquantized. pdlaunch matched the whole name only, so it expected fp8 there and
    refused the checkpoint ("is float32 but config.json quantizes this module")."""
    served, reference = make_fp8_qwen3(tmp_path, "channel")
    keep_in_model_dtype(served, reference, ("q_proj", "k_proj", "v_proj", "o_proj"))
    cfg = json.loads((served / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["lm_head", "re:.*self_attn"]
    (served / "config.json").write_text(json.dumps(cfg))
    assert check(["--model", str(served), "--device", "cpu"]).exit_code == 0
    model = load_model(load_checkpoint(str(served)), torch.device("cpu"), torch.float32)
    o_proj = model.model.layer(1).self_attn.o_proj.weight
    assert torch.equal(o_proj, load_file(reference / "model.safetensors")["model.layers.1.self_attn.o_proj.weight"])
    quant = parse_quant_config(cfg["quantization_config"])
    assert quant is not None and not quant.skips("model.layers.0.mlp.down_proj")
    ends = parse_quant_config({**CHANNEL, "ignore": ["re:.*mlp.gate$"]})
    assert ends is not None and ends.skips("model.layers.0.mlp.gate") and not ends.skips("model.layers.0.mlp.gate_proj")


@pytest.fixture(scope="module")
def fp8_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8-bad")
    moe, moe_float = make_fp8_qwen3(root, "block", moe=True)
    return {"block": make_fp8_qwen3(root, "block")[0], "channel": make_fp8_qwen3(root, "channel")[0],
            "moe": moe, "moe_float": moe_float, "kv": make_fp8_qwen3(root / "kv", "block", kv_scales=(0.5, 0.25))[0]}


Edit = Callable[[dict[str, torch.Tensor]], None]


def _broken(fp8_bases: dict[str, Path], kind: str, tmp_path: Path, edit: Edit) -> Path:
    path = Path(shutil.copytree(fp8_bases[kind], tmp_path / kind))
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _set_first(name: str, value: float) -> Edit:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        scale = tensors[name].clone()
        scale.view(-1)[0] = value
        tensors[name] = scale
    return edit


def _cast(name: str, dtype: torch.dtype) -> Edit:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].to(dtype)
    return edit


def _load_error(path: Path) -> str:
    with pytest.raises(PdlaunchError) as err:
        load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)
    return str(err.value)


DENSE = "model.layers.1.mlp.down_proj.weight_scale_inv"
CHANNEL_SCALE = "model.layers.0.self_attn.o_proj.weight_scale"
EXPERT = "model.layers.0.mlp.experts.1.down_proj.weight_scale_inv"
K_SCALE, V_SCALE = "model.layers.0.self_attn.k_scale", "model.layers.1.self_attn.v_scale"


@pytest.mark.parametrize("kind,edit,name,text", [
    ("block", _set_first(DENSE, float("nan")), DENSE, "holds nan, but a scale is finite and not negative"),
    ("block", _set_first(DENSE, float("inf")), DENSE, "holds inf"),
    ("block", _set_first(DENSE, -0.01), DENSE, "holds -0.0099"),
    ("channel", _set_first(CHANNEL_SCALE, float("nan")), CHANNEL_SCALE, "holds nan"),
    ("moe", _set_first(EXPERT, float("nan")), EXPERT, "holds nan"),
    ("moe", _set_first(EXPERT, -1.0), EXPERT, "holds -1.0"),
    # an expert's scale was applied without the loader's dtype checks: int32 truncated it to 0
    ("moe", _cast(EXPERT, torch.int32), EXPERT, "a scale is float32, bfloat16 or float16"),
    # was "... but config.json has no FP8 quantization_config", which it has
    ("block", _cast(DENSE, torch.float8_e4m3fn), DENSE, "a scale is float32, bfloat16 or float16"),
    # KV scales divide: k / k_scale
    ("kv", _set_first(K_SCALE, 0.0), K_SCALE, "holds 0.0, but a scale is finite and positive"),
    ("kv", _set_first(V_SCALE, float("nan")), V_SCALE, "holds nan"),
    ("kv", _set_first(K_SCALE, -1.0), K_SCALE, "holds -1.0"),
])
def test_a_corrupt_scale_is_refused_by_check_config_and_the_load(kind: str, edit: Edit, name: str, text: str,
                                                                 fp8_bases: dict[str, Path], tmp_path: Path) -> None:
    path = _broken(fp8_bases, kind, tmp_path, edit)
    result = check(["--model", str(path), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    checked = " ".join(result.output.split())
    assert f"--model: tensor {name!r}" in checked and text in checked
    loaded = _load_error(path)
    assert name in loaded and text in loaded


def test_generate_refuses_a_nan_scale_and_a_malformed_config(fp8_bases: dict[str, Path], tmp_path: Path) -> None:
    path = _broken(fp8_bases, "moe", tmp_path, _set_first(EXPERT, float("nan")))
    result = invoke(["generate", "--model", str(path), "--device", "cpu", "--prompt", "hi", "--max-tokens", "4"])
    assert result.exit_code == 1 and f"--model: tensor {EXPERT!r} holds nan" in " ".join(result.output.split())
    path = Path(shutil.copytree(fp8_bases["block"], tmp_path / "cfg"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = 5
    (path / "config.json").write_text(json.dumps(cfg))
    result = invoke(["generate", "--model", str(path), "--device", "cpu", "--prompt", "hi", "--max-tokens", "4"])
    assert result.exit_code == 1, result.output
    assert "modules_to_not_convert 5 is not a list of module names" in " ".join(result.output.split())


@pytest.mark.parametrize("kind,edit", [
    ("block", _cast(DENSE, torch.bfloat16)),  # FP8-Dynamic checkpoints store bfloat16 scales
    ("moe", _cast(EXPERT, torch.float16)),
    ("block", _set_first(DENSE, 0.0)),  # an all-zero block's scale: the block is zero, as transformers computes it
])
def test_scales_real_checkpoints_hold_stay_accepted(kind: str, edit: Edit, fp8_bases: dict[str, Path],
                                                    tmp_path: Path) -> None:
    path = _broken(fp8_bases, kind, tmp_path, edit)
    assert check(["--model", str(path), "--device", "cpu"]).exit_code == 0
    load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)


def test_an_fp8_expert_weight_is_refused_where_experts_quantize_on_load(fp8_bases: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """--quantization fp8 on a GPU with FP8 support: the experts quantize each float weight as it arrives. An fp8
    weight (here in a float checkpoint) was taken for real values, without any scale; CPU and check-config
    refused it already."""
    name = "model.layers.0.mlp.experts.1.down_proj.weight"
    path = _broken(fp8_bases, "moe_float", tmp_path, _cast(name, torch.float8_e4m3fn))
    with pytest.raises(PdlaunchError, match=f"tensor '{name}' in model.safetensors is float8_e4m3fn"):
        load_model(load_checkpoint(str(path), "fp8"), torch.device("cpu"), torch.float32, fp8_experts_on_load=True)


def test_an_fp8_router_without_its_scale_names_the_scale(fp8_bases: dict[str, Path], tmp_path: Path) -> None:
    """The message said config.json had no FP8 quantization_config, beside the one it has. A router the
    quantization_config quantizes (its modules_to_not_convert does not list it) is dequantized with its scale at load
    (tests/quant/test_fp8_moe_gates.py); one stored in fp8 without a scale is refused naming the scale it lacks."""
    path = _broken(fp8_bases, "moe", tmp_path, _cast("model.layers.0.mlp.gate.weight", torch.float8_e4m3fn))
    checked = " ".join(check(["--model", str(path), "--device", "cpu"]).output.split())
    for text in (checked, _load_error(path)):
        assert "checkpoint lacks tensor(s) model.layers.0.mlp.gate.weight_scale_inv" in text


def test_an_fp8_router_the_quantization_config_keeps_is_refused_naming_it(fp8_bases: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    path = _broken(fp8_bases, "moe", tmp_path, _cast("model.layers.0.mlp.gate.weight", torch.float8_e4m3fn))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = ["lm_head", "model.layers.0.mlp.gate"]
    (path / "config.json").write_text(json.dumps(cfg))
    assert "tensor 'model.layers.0.mlp.gate.weight' in model.safetensors is float8_e4m3fn but config.json's " \
           "quantization_config lists 'model.layers.0.mlp.gate' in modules_to_not_convert (kept unquantized)" \
           in _load_error(path)


EXPERT_WEIGHT = "model.layers.0.mlp.experts.1.up_proj.weight"


@pytest.mark.parametrize("dtype,text", [
    (torch.float8_e5m2, f"tensor {EXPERT_WEIGHT!r} is float8_e5m2; pdlaunch loads FP8 weights in e4m3 "
                        "(float8_e4m3fn) only"),
    (torch.int8, f"tensor {EXPERT_WEIGHT!r} is int8, not a float dtype; pdlaunch loads float32/bfloat16/float16 "
                 "weights and FP8 (e4m3) checkpoints"),
])
def test_an_expert_weight_of_another_8_bit_dtype_is_named_as_such(dtype: torch.dtype, text: str,
                                                                  fp8_bases: dict[str, Path], tmp_path: Path) -> None:
    """An expert's e5m2 or int8 weight beside its scale read "is float8_e5m2 but has a scale and config.json quantizes
    this module": as if a float weight had a stray scale. A dense projection's says what is wrong: the dtype."""
    path = _broken(fp8_bases, "moe", tmp_path,
                   lambda t: t.__setitem__(EXPERT_WEIGHT, t[EXPERT_WEIGHT].float().to(dtype)))
    result = check(["--model", str(path), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert f"--model: {text}" in " ".join(result.output.split())
    message, hint = text.split("; ", 1)
    assert f"{message} ({hint})" in _load_error(path)


@pytest.mark.parametrize("quant,key", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "quant_method"),
    ({"quant_method": "mxfp4"}, "quant_method"),  # gpt-oss's experts
    ({**BLOCK, "weight_block_size": [64, 64]}, "weight_block_size"),
    ({**CHANNEL, "format": "int-quantized"}, "format"),
])
def test_an_unsupported_quantization_says_what_to_serve_instead(quant: dict[str, Any], key: str,
                                                                 fp8_bases: dict[str, Path], tmp_path: Path) -> None:
    """The refusal listed the formats pdlaunch loads, not what a user with a GPTQ, MXFP4 or 64-block checkpoint can
    do about it: serve the unquantized original, quantized at load if they want FP8."""
    path = Path(shutil.copytree(fp8_bases["moe_float"], tmp_path / "moe"))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": quant}))
    for args in (["check-config"], ["generate", "--prompt", "hi", "--max-tokens", "2"]):
        result = invoke([*args, "--model", str(path), "--device", "cpu"])
        assert result.exit_code == 1, result.output
        output = " ".join(result.output.split())
        assert f"(config.json:quantization_config.{key})" in output
        assert "serve the model's unquantized checkpoint instead (--quantization fp8 quantizes it at load)" in output


KEPT = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("kind,key,scale", [("block", "modules_to_not_convert", "weight_scale_inv"),
                                            ("channel", "ignore", "weight_scale")])
def test_a_scale_of_a_module_the_config_keeps_names_the_module_and_the_list(kind: str, key: str, scale: str,
                                                                            fp8_bases: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """A module modules_to_not_convert (compressed-tensors: ignore) lists, stored in the model dtype but with its
    FP8 scale beside it, read "config.json lacks (or does not match) the quantization_config": which it has. The
    message names the module, the list and both ways out."""
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{KEPT}.weight"] = tensors[f"{KEPT}.weight"].float().to(torch.bfloat16)
    path = _broken(fp8_bases, kind, tmp_path, edit)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"][key] = ["lm_head", KEPT]
    (path / "config.json").write_text(json.dumps(cfg))
    result = check(["--model", str(path), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    checked = " ".join(result.output.split())
    text = (f"tensor '{KEPT}.{scale}' in model.safetensors is an FP8 scale of module {KEPT!r}, which config.json's "
            f"quantization_config lists in {key} (kept unquantized)")
    assert f"--model: {text}" in checked, checked
    assert f"remove {KEPT!r} from {key} if the module is FP8, or drop its scale tensor(s)" in checked
    assert "lacks (or does not match)" not in checked
    assert text in _load_error(path)


def test_an_fp8_weight_of_a_module_the_config_keeps_names_the_list(fp8_bases: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    path = Path(shutil.copytree(fp8_bases["block"], tmp_path / "kept"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = ["lm_head", KEPT]
    (path / "config.json").write_text(json.dumps(cfg))
    result = check(["--model", str(path), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    checked = " ".join(result.output.split())
    assert (f"tensor '{KEPT}.weight' in model.safetensors is float8_e4m3fn but config.json's quantization_config "
            f"lists {KEPT!r} in modules_to_not_convert (kept unquantized)") in checked, checked
    assert f"tensor '{KEPT}.weight_scale_inv' in model.safetensors is an FP8 scale of module {KEPT!r}" in checked


@pytest.mark.parametrize("kind", ["block", "moe"])
def test_block_scales_without_weight_block_size_are_one_error_naming_the_key(kind: str, fp8_bases: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    """quant_method fp8 without weight_block_size reads as per-tensor FP8: each weight_scale_inv was refused as an
    "unexpected tensor" (five lines and "N more tensor problem(s)") and the key that is missing went unnamed."""
    path = Path(shutil.copytree(fp8_bases[kind], tmp_path / kind))
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]["weight_block_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    assert any(name.endswith(".weight_scale_inv") for name in load_file(path / "model.safetensors"))
    fix = 'add "weight_block_size": [128, 128] to config.json\'s quantization_config'
    result = check(["--model", str(path), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "quantization_config has no weight_block_size" in errors[0], result.output
    assert fix in " ".join(result.output.split()) and "unexpected tensor" not in result.output
    loaded = _load_error(path)
    assert "has no weight_block_size" in loaded and fix in loaded
    generated = invoke(["generate", "--model", str(path), "--device", "cpu", "--prompt", "hi", "--max-tokens", "1"])
    assert generated.exit_code == 1 and "has no weight_block_size" in generated.output, generated.output
