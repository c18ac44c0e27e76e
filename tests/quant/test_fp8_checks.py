"""FP8 checkpoints that serve would refuse are refused by check-config (and the loader) with a
`--model` problem naming the tensor or the config.json key; `bench make-checkpoint --fp8` writes
checkpoints that pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pdlaunch.bench.make_checkpoint import make_llama3_8b_shaped
from pdlaunch.cli import app
from pdlaunch.config.rules.checkpoint import checkpoint_problems
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from tests.helpers.fp8_checkpoints import Scheme, make_fp8_qwen3

SCALE = "model.layers.1.mlp.down_proj.weight_scale_inv"  # block FP8's name
SCALES = {"block": SCALE, "channel": "model.layers.1.mlp.down_proj.weight_scale"}  # per-channel: compressed-tensors'


@pytest.fixture
def block_ckpt(tmp_path: Path) -> Path:
    return make_fp8_qwen3(tmp_path, "block")[0]


def _edit_tensors(path: Path, edit: dict[str, torch.Tensor | None]) -> None:
    tensors = load_file(path / "model.safetensors")
    for name, value in edit.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _check_config(path: Path) -> str:
    result = CliRunner().invoke(app, ["check-config", "--model", str(path), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    return " ".join(result.output.split())


def _load_error(path: Path) -> str:
    with pytest.raises(PdlaunchError) as err:
        load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)
    return str(err.value)


@pytest.mark.parametrize("scheme, shape, what", [("block", (2, 3), "block scale shape mismatch"),
                                                 ("channel", (3, 1), "per-channel scale shape mismatch")])
def test_scale_of_wrong_shape(scheme: Scheme, shape: tuple[int, int], what: str, tmp_path: Path) -> None:
    ckpt, name = make_fp8_qwen3(tmp_path, scheme)[0], SCALES[scheme]
    _edit_tensors(ckpt, {name: torch.ones(shape)})
    checked = _check_config(ckpt)
    for text in (checked, _load_error(ckpt)):
        assert name in text and what in text and str(shape) in text
    assert "--model" in checked and "lacks tensor" not in checked  # the tensor is there, its shape is wrong
    assert "invalid: 1 problem(s)" in checked


@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_missing_scale_tensor(scheme: Scheme, tmp_path: Path) -> None:
    ckpt, name = make_fp8_qwen3(tmp_path, scheme)[0], SCALES[scheme]
    _edit_tensors(ckpt, {name: None})
    checked = _check_config(ckpt)
    assert "--model" in checked
    for text in (checked, _load_error(ckpt)):
        assert f"lacks tensor(s) {name}" in text


def test_block_size_64_and_e5m2_are_refused(block_ckpt: Path) -> None:
    cfg = json.loads((block_ckpt / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 64]
    (block_ckpt / "config.json").write_text(json.dumps(cfg))
    text = _check_config(block_ckpt)
    assert "weight_block_size [64, 64] is not supported (only [128, 128])" in text
    assert "quantization_config.weight_block_size" in text
    cfg["quantization_config"].update(weight_block_size=[128, 128], fmt="e5m2")
    (block_ckpt / "config.json").write_text(json.dumps(cfg))
    assert "FP8 format 'e5m2' is not supported" in _check_config(block_ckpt)


def test_compressed_tensors_block_64_and_group_strategy_are_refused(tmp_path: Path) -> None:
    """The per-channel (compressed-tensors) layout's block size lives in weights.block_structure."""
    ckpt = make_fp8_qwen3(tmp_path, "channel")[0]
    cfg = json.loads((ckpt / "config.json").read_text())
    weights = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    weights.update(strategy="block", block_structure=[64, 64])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    text = _check_config(ckpt)
    assert "quantization_config.config_groups.group_0.weights.block_structure" in text
    assert "block_structure [64, 64] is not supported (only [128, 128])" in text
    weights.update(strategy="group", block_structure=None)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert "weight strategy 'group' is not supported (channel, tensor or block)" in _check_config(ckpt)


def test_fp8_tensor_without_quantization_config(block_ckpt: Path) -> None:
    cfg = json.loads((block_ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (block_ckpt / "config.json").write_text(json.dumps(cfg))
    assert "config.json lacks (or does not match) the quantization_config" in _check_config(block_ckpt)
    assert "is float8_e4m3fn but config.json has no FP8 quantization_config" in _load_error(block_ckpt)


@pytest.mark.parametrize("fp8", ["block", "channel"])
def test_make_checkpoint_fp8_passes_check_config_and_loads(fp8: str, tmp_path: Path) -> None:
    small = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 128, "vocab_size": 640}
    path = make_llama3_8b_shaped(tmp_path / fp8, num_layers=1, overrides=small, fp8=fp8)
    assert checkpoint_problems(str(path)) == []
    ckpt = load_checkpoint(str(path))
    assert ckpt.quant is not None and ckpt.quant.scheme == fp8
    model = load_model(ckpt, torch.device("cpu"), torch.float32)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32


def test_check_config_refuses_a_tp_size_that_splits_fp8_blocks(block_ckpt: Path) -> None:
    """intermediate 384 = 3 blocks: TP 2 gives each rank 192 rows of gate/up, half a block."""
    from pdlaunch.model.arch import parse_hf_config
    from pdlaunch.model.quant.block_tp import block_misaligned

    cfg = json.loads((block_ckpt / "config.json").read_text())
    arch = parse_hf_config({**cfg, "intermediate_size": 384})
    assert block_misaligned(arch, 1) == [] and block_misaligned(arch, 2) == [
        "gate_proj/up_proj/down_proj (config.json intermediate_size 384: 192 a rank)"]
    assert block_misaligned(parse_hf_config(cfg), 2) == []
    (block_ckpt / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 4, "head_dim": 64}))
    text = _check_config_tp(block_ckpt, 2)
    assert "--tp: TP 2 splits the block-FP8 projections k_proj/v_proj off the 128-wide" in text


def _check_config_tp(path: Path, tp: int) -> str:
    result = CliRunner().invoke(app, ["check-config", "--model", str(path), "--device", "cpu", "--tp", str(tp)])
    assert result.exit_code == 1, result.output
    return " ".join(result.output.split())


def test_fused_projections_off_a_block_edge_are_named_once(tmp_path: Path) -> None:
    """A block-FP8 Llama whose q_proj has 64 rows: k_proj starts mid-block in the fused qkv weight. Each layer's k and
    v scales were refused as "the shard starts at row/column 64 ... (a tensor-parallel shard must cover whole blocks);
    the checkpoint does not match its config.json" (4 problems at TP 1, the checkpoint being what its config says)."""
    from pdlaunch.model.quant.fp8 import quantize_block
    from tests.helpers.checkpoints import make_llama

    path = make_llama(tmp_path / "llama")  # hidden 64, 4 heads of 16, 2 KV heads: q 64 rows, k and v 32
    out: dict[str, torch.Tensor] = {}
    for name, weight in load_file(path / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if name.endswith("_proj.weight"):
            out[name], out[f"{module}.weight_scale_inv"] = quantize_block(weight.float())
        else:
            out[name] = weight
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic"}
    (path / "config.json").write_text(json.dumps(cfg))
    checked = _check_config(path)
    assert "invalid: 1 problem(s)" in checked and "checkpoint does not match" not in checked
    for text in (checked, _load_error(path)):
        assert ("model.layers.0.self_attn.k_proj starts at row 64 of model.layers.0.self_attn.qkv_proj "
                "(q_proj/k_proj/v_proj in one matmul), not on a 128 edge") in text
        assert "--quantization fp8" in text


def test_static_activation_scales_of_a_quant_method_fp8_checkpoint_are_refused_saying_what_to_do() -> None:
    """AutoFP8's per-tensor checkpoints with calibrated input scales (Mixtral-8x7B-Instruct-v0.1-FP8: activation_scheme
    static, a weight_scale and an input_scale per projection). The refusal said only that pdlaunch loads dynamic
    activation scales, not that the checkpoint's input_scale tensors are what it cannot use, nor what to serve instead
    (compressed-tensors' static scheme named both already)."""
    from pdlaunch.model.quant.config import parse_quant_config

    with pytest.raises(PdlaunchError) as err:
        parse_quant_config({"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]})
    assert err.value.field == "config.json:quantization_config.activation_scheme"
    assert "calibrated input_scale tensors" in err.value.message
    assert err.value.hint is not None and "--quantization fp8" in err.value.hint
    assert "activation_scheme dynamic" in err.value.hint
