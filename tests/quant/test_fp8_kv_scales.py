"""The k/v scales an FP8 KV cache applies, where the checkpoint lacks them or gives one per KV head: without them
`--kv-cache-dtype fp8` warns once per instance that it stores with 1.0; per-head ones are left unused by a cache
of the model dtype (auto) and refused, as such, by an fp8 one."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from tests.config.cli_helpers import check
from tests.engine.conftest import MakeEngine, run_all
from tests.engine.test_engine_parity import random_prompts
from tests.helpers.fp8_checkpoints import make_fp8_qwen3

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
K_SCALE, V_SCALE = 0.5, 0.25
WARNING = "--kv-cache-dtype fp8: the checkpoint has no k/v scales"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float32 Qwen3 of 2 layers (2 KV heads) without k/v scales, with them, with them on layer 0 only, and with
    per-head ones ([2] each) on every layer."""
    root = tmp_path_factory.mktemp("kv-scale-ckpts")
    plain = make_fp8_qwen3(root / "plain", "online")[0]
    scaled = make_fp8_qwen3(root / "scaled", "online", kv_scales=(K_SCALE, V_SCALE))[0]
    return {"plain": plain, "scaled": scaled,
            "layer0": _edited(scaled, root / "layer0", lambda t: {n: v for n, v in t.items() if ".layers.1." not in n
                                                                  or not n.endswith(("k_scale", "v_scale"))}),
            "per_head": _edited(scaled, root / "per-head", lambda t: {
                n: v.reshape(1).repeat(2) if n.endswith(("k_scale", "v_scale")) else v for n, v in t.items()})}


def _edited(source: Path, directory: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    path = Path(shutil.copytree(source, directory))
    tensors = load_file(path / "model.safetensors")
    save_file(edit(tensors), path / "model.safetensors", metadata={"format": "pt"})
    return path


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and WARNING in r.getMessage()]


def test_fp8_cache_without_checkpoint_scales_warns_once(ckpts: dict[str, Path], make_engine: MakeEngine,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """It stored k and v with scales of 1.0 and said nothing (vLLM warns)."""
    caplog.set_level(logging.WARNING)
    engine = make_engine(ckpts["plain"], kv_cache_dtype="fp8")
    run_all(engine, random_prompts([9], seed=3), GREEDY)  # steps say it no more
    (message,) = _warnings(caplog)
    assert "for any layer" in message and "scales of 1.0" in message
    assert "may lose accuracy for activations outside fp8 e4m3's range" in message
    caplog.clear()
    make_engine(ckpts["layer0"], kv_cache_dtype="fp8")
    (message,) = _warnings(caplog)
    assert "for 1 of its 2 layers (the first: layer 1)" in message
    caplog.clear()
    make_engine(ckpts["scaled"], kv_cache_dtype="fp8")
    make_engine(ckpts["plain"])  # auto: no scale is applied, none is missed
    assert _warnings(caplog) == []


def test_per_head_scales_are_left_unused_by_a_model_dtype_cache(ckpts: dict[str, Path], make_engine: MakeEngine,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """They were refused with --kv-cache-dtype auto too, which does not use them, as "the checkpoint does not match
    its config.json"."""
    path = ckpts["per_head"]
    result = check(["--model", str(path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    caplog.set_level(logging.DEBUG, logger="pdlaunch.model.checkpoint_tensors")
    model = load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)
    assert model.kv_scales() == [(1.0, 1.0)] * 2
    assert any("per-head k/v scales (2,) left unused" in r.getMessage() for r in caplog.records)
    prompts = random_prompts([9, 21], seed=6)
    assert [o.output_token_ids for o in run_all(make_engine(path), prompts, GREEDY)] == \
        [o.output_token_ids for o in run_all(make_engine(ckpts["plain"]), prompts, GREEDY)]


def test_per_head_scales_are_refused_as_such_by_an_fp8_cache(ckpts: dict[str, Path],
                                                             make_engine: MakeEngine) -> None:
    path = ckpts["per_head"]
    name = "model.layers.0.self_attn.k_scale"
    text = f"tensor {name!r} in model.safetensors holds 2 values (shape (2,)): per-head k/v scales, which " \
           "pdlaunch's FP8 KV cache (--kv-cache-dtype fp8) does not support"
    result = check(["--model", str(path), "--device", "cpu", "--kv-cache-dtype", "fp8"])
    checked = " ".join(result.output.split())
    assert result.exit_code == 1 and text in checked, result.output
    assert "--kv-cache-dtype auto, which does not use k/v scales" in checked
    assert "does not match its config.json" not in checked
    with pytest.raises(PdlaunchError) as err:
        load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32, fp8_kv_cache=True)
    assert text in err.value.message and err.value.hint is not None and "per-tensor k/v scales" in err.value.hint
    with pytest.raises(PdlaunchError, match="per-head k/v scales"):
        make_engine(path, kv_cache_dtype="fp8")
