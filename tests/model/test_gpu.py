"""CUDA: float32 parity with transformers, bf16 within bf16 tolerance, flash prefill, Triton decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from pdlaunch.model.triton_decode import paged_decode_available
from tests.helpers.checkpoints import hf_greedy, hf_logits
from tests.model.paged_runner import PagedRunner
from tests.model.test_parity import PROMPT

pytestmark = pytest.mark.gpu

KINDS = ["llama_ckpt", "qwen2_ckpt", "mistral_ckpt", "hybrid_ckpt", "sharded_ckpt"]
CUDA = torch.device("cuda")


def _model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    return load_model(load_checkpoint(str(path)), CUDA, dtype)


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_float32_prompt_logits_match_transformers(kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(kind)
    logits = PagedRunner(_model(path, torch.float32)).step({"a": PROMPT})["a"]
    torch.testing.assert_close(logits, hf_logits(path, PROMPT, device="cuda"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_float32_greedy_decode_matches_transformers(kind: str, backend: str, request: pytest.FixtureRequest,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_PAGED_DECODE", "auto" if backend == "triton" else "torch")
    path = request.getfixturevalue(kind)
    ours = PagedRunner(_model(path, torch.float32), block_size=4).greedy(PROMPT, 16, chunk=7)
    assert ours == hf_greedy(path, PROMPT, 16, device="cuda")


@pytest.mark.parametrize("kind", ["llama_ckpt", "mistral_ckpt", "hybrid_ckpt"])
def test_cuda_triton_decode_equals_torch_gather(kind: str, request: pytest.FixtureRequest,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Batched decodes of sequences of different lengths: kernel vs reference, step by step."""
    path = request.getfixturevalue(kind)
    model = _model(path, torch.float32)
    prompts = {"a": PROMPT, "b": PROMPT[:5], "c": [507] + list(range(100, 140))}
    results = {}
    for backend in ("auto", "torch"):
        monkeypatch.setenv("PDLAUNCH_PAGED_DECODE", backend)
        runner = PagedRunner(model, block_size=8)
        assert paged_decode_available(runner.kv_caches[0]) == (backend == "auto")
        runner.step(prompts)
        steps = [runner.step({s: [300 + i] for s in prompts}) for i in range(6)]
        results[backend] = torch.stack([torch.cat([out[s] for s in "abc"]) for out in steps])
    torch.testing.assert_close(results["auto"], results["torch"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama_ckpt", "hybrid_ckpt"])
def test_cuda_bfloat16_logits_within_bf16_tolerance(kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(kind)
    ours = PagedRunner(_model(path, torch.bfloat16), block_size=4).step({"a": PROMPT})["a"]
    theirs = hf_logits(path, PROMPT, dtype=torch.bfloat16, device="cuda")
    exact = hf_logits(path, PROMPT, device="cuda")
    # Both runs round to bf16 (8 bits of mantissa) at every layer; measure against the float32
    # logits' spread so the bound does not depend on the random checkpoint's scale.
    scale = exact.std().item()
    assert (ours - theirs).abs().max().item() < 0.1 * scale
    assert (ours - exact).abs().max().item() < 0.1 * scale
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9


def test_cuda_fresh_prefill_runs_on_flash_attention(llama_ckpt: Path) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _model(llama_ckpt, torch.bfloat16)
    runner = PagedRunner(model, block_size=16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if our prefill cannot use flash
        logits = runner.step({"a": PROMPT})["a"]
    assert torch.isfinite(logits).all()
