"""FP8 KV cache on CPU: e4m3 cache tensors (a quarter of float32's block bytes), the checkpoint's
per-layer k/v scales applied on write and read, and the handshake refusing a peer whose KV dtype or
scales differ, naming both sides."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.handshake import check_compatible
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from pdlaunch.model.quant.fp8 import FP8_DTYPE
from tests.config.cli_helpers import check
from tests.engine.conftest import MakeEngine, run_all
from tests.engine.test_engine_parity import random_prompts
from tests.helpers.fp8_checkpoints import make_fp8_qwen3
from tests.kv_transfer.pd_procs import make_spec
from tests.kv_transfer.test_pieces import _info

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
K_SCALE, V_SCALE = 0.5, 0.25


@pytest.fixture(scope="module")
def scaled_ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One float32 Qwen3, saved with and without self_attn.k_scale / v_scale tensors."""
    scaled, _ = make_fp8_qwen3(tmp_path_factory.mktemp("kv-scales"), "online", kv_scales=(K_SCALE, V_SCALE))
    plain, _ = make_fp8_qwen3(tmp_path_factory.mktemp("kv-plain"), "online")
    return scaled, plain


def test_fp8_cache_applies_checkpoint_scales(scaled_ckpts: tuple[Path, Path], make_engine: MakeEngine) -> None:
    scaled_ckpt, plain_ckpt = scaled_ckpts
    prompts = random_prompts([9, 21], seed=6)
    exact = make_engine(scaled_ckpt, max_num_batched_tokens=16)
    unscaled = make_engine(plain_ckpt, max_num_batched_tokens=16, kv_cache_dtype="fp8")
    fp8 = make_engine(scaled_ckpt, max_num_batched_tokens=16, kv_cache_dtype="fp8")
    assert fp8.runner.kv_caches[0].dtype == FP8_DTYPE and exact.runner.kv_caches[0].dtype == torch.float32
    assert fp8.runner.block_bytes * 4 == exact.runner.block_bytes
    assert fp8.runner.model.kv_scales() == [(K_SCALE, V_SCALE)] * 2
    run_all(exact, prompts, GREEDY)
    fp8_out = run_all(fp8, prompts, GREEDY)
    # Same prompts on fresh engines: the same blocks; block 0 holds the first prompt's first 8 tokens,
    # and layer 0's k/v depend on no attention output, so they are the same numbers in both. Stored
    # k / k_scale and v / v_scale, e4m3-rounded (relative error <= 2^-4, subnormals below 2^-9 * scale),
    # so unscaled they match the float32 cache; unapplied scales would be 2x / 4x off.
    ref, got = exact.runner.kv_caches[0][0, 0], fp8.runner.kv_caches[0][0, 0].float()  # [2, block, Hkv, D]
    got[0] *= K_SCALE
    got[1] *= V_SCALE
    assert torch.allclose(got, ref, rtol=2**-4, atol=2e-3)
    # Reads unscale too: power-of-two scales change no rounding, so decoding over the scaled fp8 cache
    # gives exactly the ids of the unscaled (1.0) fp8 cache; a scale missed on read or write would not.
    assert unscaled.runner.model.kv_scales() == [(1.0, 1.0)] * 2
    unscaled_out = run_all(unscaled, prompts, GREEDY)
    assert [o.output_token_ids for o in fp8_out] == [o.output_token_ids for o in unscaled_out]
    spec = fp8.kv_cache_spec()
    assert spec.kv_cache_dtype == FP8_DTYPE and spec.kv_scales and exact.kv_cache_spec().kv_scales == ""


@pytest.mark.parametrize("field, value", [("kv_cache_dtype", "float8_e4m3fn"), ("kv_scales", "0a1b2c3d4e5f")])
def test_handshake_refuses_other_kv_dtype_or_scales(field: str, value: str) -> None:
    spec = make_spec()
    check_compatible(spec, _info(spec))
    with pytest.raises(KVTransferError) as err:
        check_compatible(spec, _info(spec, **{field: value}))
    mine = "float32" if field == "kv_cache_dtype" else ""
    assert f"{field} differs (prefill engine P: {value!r}, this engine: {mine!r})" in str(err.value)
    assert err.value.field in ("cache.kv_cache_dtype", "model.path") and err.value.hint


def test_fp8_blocks_through_prefix_cache_and_cpu_tier(scaled_ckpts: tuple[Path, Path],
                                                      make_engine: MakeEngine) -> None:
    """A prompt served again after its fp8 blocks were evicted to the CPU tier (bytes copied, scales
    unchanged) answers as the first time, from the loaded blocks."""
    engine = make_engine(scaled_ckpts[0], kv_cache_dtype="fp8", block_size=4, num_gpu_blocks=12,
                         kv_offload_gb=0.001, max_num_batched_tokens=16)
    assert engine.offload is not None and engine.offload.tier.caches[0].dtype == FP8_DTYPE
    prompt, *flush = random_prompts([22, 23, 21, 22], seed=12)
    first = run_all(engine, [prompt], GREEDY)[0]
    for other in flush:
        run_all(engine, [other], GREEDY)
    before = engine.stats()
    again = run_all(engine, [prompt], GREEDY)[0]
    assert engine.stats()["offload_hit_blocks"] - before["offload_hit_blocks"] == (len(prompt) - 1) // 4
    assert again.output_token_ids == first.output_token_ids


def _renamed(scaled: Path, tmp_path: Path, names: dict[str, str], value: float | None = None) -> Path:
    """The scaled checkpoint with its k/v scales under other names (`value`: layer 0's first one set to it)."""
    path = Path(shutil.copytree(scaled, tmp_path / "renamed"))
    tensors = load_file(path / "model.safetensors")
    for layer in range(2):
        for ours, theirs in names.items():
            tensors[f"model.layers.{layer}.self_attn.{theirs}"] = tensors.pop(f"model.layers.{layer}.self_attn.{ours}")
    if value is not None:
        tensors[f"model.layers.0.self_attn.{names['k_scale']}"] = torch.tensor(value)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("names", [{"k_scale": "k_proj.output_scale", "v_scale": "v_proj.output_scale"},
                                   {"k_scale": "k_proj.k_scale", "v_scale": "v_proj.v_scale"}])
def test_kv_scales_under_the_names_other_quantizers_write_load(scaled_ckpts: tuple[Path, Path], tmp_path: Path,
                                                               names: dict[str, str]) -> None:
    """Older compressed-tensors (`k_proj.output_scale`) and ModelOpt (`k_proj.k_scale`) name the KV cache scales
    otherwise; vLLM maps them. They were refused as "unexpected tensor ... does not match its config.json"."""
    path = _renamed(scaled_ckpts[0], tmp_path, names)
    assert check(["--model", str(path), "--device", "cpu"]).exit_code == 0
    model = load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)
    assert model.kv_scales() == [(K_SCALE, V_SCALE)] * 2
    zero = _renamed(scaled_ckpts[0], tmp_path / "zero", names, value=0.0)  # a divisor: check-config reads its value
    checked = " ".join(check(["--model", str(zero), "--device", "cpu"]).output.split())
    assert f"tensor 'model.layers.0.self_attn.{names['k_scale']}' in model.safetensors holds 0.0" in checked
