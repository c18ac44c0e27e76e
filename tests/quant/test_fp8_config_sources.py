"""Where a checkpoint declares its quantization besides config.json's `quantization_config`: compressed-tensors'
older `compression_config` key loads as that format (vLLM reads it too), and a quantization file beside config.json
(ModelOpt, GPTQ, AWQ) is refused naming that file, by check-config and by the load alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from tests.config.cli_helpers import check, invoke
from tests.helpers.fp8_checkpoints import make_fp8_qwen3


@pytest.fixture(scope="module")
def channel_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fp8_qwen3(tmp_path_factory.mktemp("fp8-sources"), "channel")[0]


def _moved(channel_ckpt: Path, tmp_path: Path, keep_method: bool = True, edit: dict[str, object] | None = None) -> Path:
    """The per-channel checkpoint with its quantization_config under compression_config."""
    path = Path(shutil.copytree(channel_ckpt, tmp_path / "moved"))
    cfg = json.loads((path / "config.json").read_text())
    quant = {**cfg.pop("quantization_config"), **(edit or {})}
    if not keep_method:
        del quant["quant_method"]
    cfg["compression_config"] = quant
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("keep_method", [True, False])
def test_compression_config_loads_as_compressed_tensors(channel_ckpt: Path, tmp_path: Path,
                                                        keep_method: bool) -> None:
    """Its fp8 tensors were refused: "... is float8_e4m3fn but config.json has no FP8 quantization_config"."""
    path = _moved(channel_ckpt, tmp_path, keep_method)
    assert check(["--model", str(path), "--device", "cpu"]).exit_code == 0
    ckpt = load_checkpoint(str(path))
    assert ckpt.quant == load_checkpoint(str(channel_ckpt)).quant
    ours = load_model(ckpt, torch.device("cpu"), torch.float32).state_dict()
    reference = load_model(load_checkpoint(str(channel_ckpt)), torch.device("cpu"), torch.float32).state_dict()
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


def test_an_unsupported_compression_config_is_refused_with_its_key(channel_ckpt: Path, tmp_path: Path) -> None:
    path = _moved(channel_ckpt, tmp_path, edit={"format": "int-quantized"})
    with pytest.raises(PdlaunchError) as err:
        load_checkpoint(str(path))
    assert err.value.field == "config.json:compression_config.format"
    assert "format 'int-quantized'" in err.value.message and "is not supported" in err.value.message


@pytest.mark.parametrize("name,method", [("hf_quant_config.json", "ModelOpt"), ("quantize_config.json", "GPTQ"),
                                         ("quant_config.json", "AWQ")])
def test_a_quantization_file_beside_config_json_is_refused_naming_it(channel_ckpt: Path, tmp_path: Path, name: str,
                                                                     method: str) -> None:
    """Its tensors were refused one by one as "float8_e4m3fn but config.json has no FP8 quantization_config"."""
    path = Path(shutil.copytree(channel_ckpt, tmp_path / "side"))
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    (path / name).write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8"}}))
    said = f"{path / name} says the weights are {method}-quantized, which pdlaunch does not load"
    checked = check(["--model", str(path), "--device", "cpu"])
    assert checked.exit_code == 1 and said in " ".join(checked.output.split())
    assert "float8_e4m3fn" not in checked.output
    generated = invoke(["generate", "--model", str(path), "--device", "cpu", "--prompt", "hi", "--max-tokens", "1"])
    assert generated.exit_code == 1 and said in " ".join(generated.output.split())
