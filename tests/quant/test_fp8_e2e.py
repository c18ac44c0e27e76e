"""FP8 through the user's paths on CPU: `pdlaunch generate` and a 1P1D `pdlaunch serve` answer with
transformers' greedy ids on the dequantized weights (block FP8, per-channel FP8, --quantization fp8);
with --kv-cache-dtype fp8 a PD pair answers like a colocated engine with the same setting and moves a
quarter of float32's KV bytes and half of bfloat16's (pdlaunch_kv_transfer_bytes_total)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.model.tokenizer import Tokenizer
from tests.helpers.checkpoints import hf_greedy
from tests.helpers.fp8_checkpoints import weight_only_copy
from tests.kv_transfer.test_pd_engines import PROMPTS, colocated, pd_pair, run_pd
from tests.serving.e2e import Serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PROMPT = "The quick brown fox jumps"
MAX_TOKENS = 6


def _expected(served: Path, reference: Path) -> list[int]:
    ids = Tokenizer(served).encode(PROMPT)
    return hf_greedy(reference, ids, MAX_TOKENS)


def _flags(scheme: str) -> list[str]:
    return ["--quantization", "fp8"] if scheme == "online" else []


def _generate_matches_reference(served: Path, reference: Path, flags: list[str]) -> None:
    """`pdlaunch generate` on CPU in float32 answers with transformers' greedy ids on the dequantized weights."""
    expected = hf_greedy(reference, Tokenizer(served).encode(PROMPT), MAX_TOKENS, stop_at_eos=True)
    result = CliRunner().invoke(app, ["generate", "--model", str(served), "--device", "cpu", "--dtype", "float32",
                                      "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS), "--json", *flags])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["token_ids"] == expected


@pytest.mark.parametrize("scheme", ["block", "channel", "online"])
def test_generate_cli(scheme: str, fp8_ckpts: dict[str, tuple[Path, Path]]) -> None:
    served, reference = fp8_ckpts[scheme]
    _generate_matches_reference(served, reference, _flags(scheme))


@pytest.mark.parametrize("scheme", ["channel", "tensor"])
def test_generate_cli_with_dynamic_per_tensor_activations(scheme: str, fp8_ckpts: dict[str, tuple[Path, Path]],
                                                          tmp_path: Path) -> None:
    """An llm-compressor checkpoint whose input activations are dynamic per tensor (one scale per step's input,
    computed at run time; vLLM serves it) was refused, the message blaming static input scales it does not have."""
    served, reference = fp8_ckpts[scheme]
    path = Path(shutil.copytree(served, tmp_path / served.name))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]["strategy"] = "tensor"
    (path / "config.json").write_text(json.dumps(cfg))
    _generate_matches_reference(path, reference, [])


@pytest.mark.parametrize("scheme", ["channel", "tensor"])
def test_generate_cli_with_weight_only_fp8(scheme: str, fp8_ckpts: dict[str, tuple[Path, Path]],
                                           tmp_path: Path) -> None:
    """A compressed-tensors checkpoint that quantizes only its weights (a group without input_activations: FP8
    weight-only, W8A16) loads: on CPU its weights are dequantized at load, as every FP8 checkpoint's are."""
    served, reference = fp8_ckpts[scheme]
    path = weight_only_copy(served, tmp_path)
    _generate_matches_reference(path, reference, [])


@pytest.mark.parametrize("scheme", ["block", "channel", "online"])
def test_serve_1p1d(scheme: str, fp8_ckpts: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    served, reference = fp8_ckpts[scheme]
    deployment = Serve(tmp_path, ["--model", str(served), "--prefill", "1", "--decode", "1", "--num-gpu-blocks", "128",
                                  "--block-size", "8", *_flags(scheme)])
    try:
        deployment.wait_ready()
        body = {"model": str(served), "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        answer = httpx.post(f"{deployment.url}/v1/completions", json=body, timeout=120).json()
        assert answer["choices"][0]["token_ids"] == _expected(served, reference), answer
        for url in deployment.instance_urls().values():
            info = httpx.get(f"{url}/info", timeout=5).json()
            assert info["weight_dtype"].startswith("fp8 ") and info["weight_dtype"].endswith(", computed in float32")
            assert info["kv_cache_dtype"] == "float32"
            metrics = httpx.get(f"{url}/metrics", timeout=5).text
            assert 'pdlaunch_model_dtypes_info{kv_cache_dtype="float32",weight_dtype="fp8' in metrics
    finally:
        deployment.stop()


def _moved(model: Path, dtype: str, kv_cache_dtype: str, mode: str) -> tuple[int, dict[str, list[int]]]:
    """KV bytes one PD pair moved for PROMPTS (the decode side's pdlaunch_kv_transfer_bytes_total), and
    its greedy answers."""
    for prefill, decode in pd_pair(model, "nixl", mode, dtype=dtype, kv_cache_dtype=kv_cache_dtype):
        before = decode.call("check")["bytes_moved"]
        outs = run_pd(prefill, decode, PROMPTS)
        return int(decode.call("check")["bytes_moved"] - before), {rid: o["tokens"] for rid, o in outs.items()}
    raise AssertionError("pd_pair yielded nothing")


def test_fp8_kv_pd_equals_colocated_and_moves_fewer_bytes(fp8_ckpts: dict[str, tuple[Path, Path]]) -> None:
    model = fp8_ckpts["online"][0]  # a float32 checkpoint
    fp8_bytes, fp8_answers = _moved(model, "float32", "fp8", "push")
    assert fp8_answers == colocated(model, PROMPTS, kv_cache_dtype="fp8")
    fp32_bytes, _ = _moved(model, "float32", "auto", "pull")
    bf16_bytes, _ = _moved(model, "bfloat16", "auto", "pull")
    assert fp8_bytes > 0 and fp8_bytes * 4 == fp32_bytes and fp8_bytes * 2 == bf16_bytes


def test_fp8_kv_mixed_tp_pd_equals_colocated(fp8_ckpts: dict[str, tuple[Path, Path]]) -> None:
    """P1/D2: each decode rank reads its KV head's slice of the prefill's fp8 blocks (resharding copies bytes)."""
    from tests.tp.pd_procs import tp_pd_pair
    from tests.tp.test_tp_pd import run_pd as run_tp_pd

    model = fp8_ckpts["online"][0]
    prompts = {rid: PROMPTS[rid] for rid in ("block-plus-one", "many-blocks")}
    expected = colocated(model, prompts, kv_cache_dtype="fp8")
    for prefill, decode in tp_pd_pair(model, 1, 2, kv_cache_dtype="fp8"):
        outs = run_tp_pd(prefill, decode, prompts)
        assert {rid: o["tokens"] for rid, o in outs.items()} == expected
