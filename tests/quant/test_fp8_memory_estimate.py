"""check-config's GPU memory estimate counts an FP8 checkpoint's projections at one byte a weight, as they load.
They were counted at the model dtype (bf16: twice their size), so an FP8 checkpoint that fits a GPU, the reason
to use one, was refused as needing about twice the weight memory it does."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.model_info import load_model_info
from pdlaunch.config.rules.memory import estimate, fp8_parameters
from pdlaunch.model.quant.config import load_quant_config
from tests.config.cli_helpers import check
from tests.helpers.fp8_checkpoints import keep_in_model_dtype, make_fp8_qwen3

GIB = 1 << 30


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8-memory")
    block, reference = make_fp8_qwen3(root, "block")
    moe, moe_reference = make_fp8_qwen3(root, "block", moe=True)
    kept, kept_reference = make_fp8_qwen3(root / "kept", "block", moe=True)
    keep_in_model_dtype(kept, kept_reference, ("q_proj", "k_proj", "v_proj", "o_proj"))
    return {"block": block, "reference": reference, "moe": moe, "moe_reference": moe_reference, "kept": kept}


def _numel(path: Path, fp8_only: bool = False, experts_only: bool = False) -> int:
    """Weights of the checkpoint (scales left out): all, its fp8 ones, or its MoE experts'."""
    total = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            tensor = f.get_slice(name)
            if name.endswith(("weight_scale_inv", "weight_scale")):
                continue
            if fp8_only and tensor.get_dtype() != "F8_E4M3" or experts_only and ".experts." not in name:
                continue
            numel = 1
            for size in tensor.get_shape():
                numel *= size
            total += numel
    return total


def _fp8_count(path: Path, quantization: str | None = None) -> int:
    info, problems = load_model_info(str(path))
    assert info is not None and not problems
    return fp8_parameters(info, load_quant_config(path, quantization))


def test_the_fp8_weights_counted_are_those_the_checkpoint_stores_in_fp8(ckpts: dict[str, Path]) -> None:
    for kind in ("block", "moe", "kept"):  # kept: the attention in modules_to_not_convert, stored in float32
        assert _fp8_count(ckpts[kind]) == _numel(ckpts[kind], fp8_only=True) > 0, kind
    assert _fp8_count(ckpts["reference"]) == 0
    # --quantization fp8: the dense projections load in the model dtype (quantized once loaded), experts as fp8
    assert _fp8_count(ckpts["reference"], "fp8") == 0
    assert _fp8_count(ckpts["moe_reference"], "fp8") == _numel(ckpts["moe_reference"], experts_only=True) > 0


def test_experts_128_blocks_do_not_tile_count_at_the_model_dtype(ckpts: dict[str, Path]) -> None:
    """The tiny MoE's experts are 128 wide: TP 2 leaves 64 a rank, and they load in the model dtype, unless expert
    parallel keeps each expert whole on its rank."""
    path = ckpts["moe"]
    info, _ = load_model_info(str(path))
    assert info is not None

    def weights(expert_parallel: bool) -> int:
        cfg = DeploymentConfig.model_validate({
            "device": "cuda", "model": {"path": str(path), "dtype": "bfloat16", "max_model_len": 16},
            "parallel": {"enable_expert_parallel": expert_parallel},
            "instances": [{"role": "prefill", "tp": 2}, {"role": "decode", "tp": 2}]})
        return estimate(cfg, info)[0].weights_bytes * 2  # per rank -> both ranks

    experts, fp8 = _numel(path, experts_only=True), _numel(path, fp8_only=True)
    assert weights(False) - weights(True) == experts < fp8


def test_an_fp8_checkpoint_that_fits_the_gpu_is_not_refused(ckpts: dict[str, Path]) -> None:
    """A budget between the checkpoint's bf16 and FP8 weight bytes: the FP8 checkpoint fits, its bf16 twin does not
    (the check still refuses what does not fit)."""
    all_weights, fp8_weights = _numel(ckpts["block"]), _numel(ckpts["block"], fp8_only=True)
    bf16_bytes, fp8_bytes = 2 * all_weights, 2 * all_weights - fp8_weights
    gib = (bf16_bytes + fp8_bytes) / 2 / 0.9 / GIB  # the budget is 0.9 x a GPU's memory
    args = ["--device", "cuda", "--target-gpus", "2", "--target-gpu-memory", f"{gib:.6f}", "--dtype", "bfloat16",
            "--max-model-len", "16", "--block-size", "16"]
    fp8 = check(["--model", str(ckpts["block"]), *args])
    assert fp8.exit_code == 0, fp8.output
    bf16 = check(["--model", str(ckpts["reference"]), *args])
    assert bf16.exit_code == 1 and "prefill needs" in bf16.output, bf16.output
