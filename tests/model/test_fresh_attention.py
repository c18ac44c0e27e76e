"""A fresh prompt's causal attention at its length bucket (model/fresh_attention.py): the buckets, padding that
changes no real row, and the warm-up that builds every bucket a step can meet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdlaunch.model import attention
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.decoder_layer import Attention
from pdlaunch.model.fresh_attention import bucket, buckets, fresh_causal_attention, warm_fresh_attention
from pdlaunch.model.llama import CausalLM
from pdlaunch.model.loader import load_model
from tests.model.paged_runner import PagedRunner


def test_buckets_are_powers_of_two_up_to_256_then_multiples_of_256() -> None:
    assert [bucket(n) for n in (1, 15, 16, 17, 100, 256, 257, 511, 512, 513, 4000, 8192)] == [
        16, 16, 16, 32, 128, 256, 512, 512, 512, 768, 4096, 8192]
    assert buckets(8192) == [16, 32, 64, 128, 256, *range(512, 8192 + 1, 256)]
    assert buckets(100) == [16, 32, 64, 128]
    assert buckets(600) == [16, 32, 64, 128, 256, 512, 768]
    assert all(bucket(n) in buckets(3000) for n in range(1, 3001))  # every length's bucket is warmed


def _qkv(n: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(1, 8, n, 64, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(1, 2, n, 64, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(1, 2, n, 64, generator=gen).to(device=device, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("n", [1, 7, 16, 100, 300, 513])
def test_padding_changes_no_real_row(n: int) -> None:
    """Padding keys come after every real query: under the causal mask none of them is seen."""
    q, k, v = _qkv(n, "cpu", torch.float32)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    got = fresh_causal_attention(q, k, v, 0.125, pad=True)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_runs_unpadded_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    layouts: list[bool] = []
    real = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(q.shape[2])
        layouts.append(q.is_contiguous())
        return real(q, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    fresh_causal_attention(*_qkv(100, "cpu", torch.float32), 0.125)
    assert seen == [100]
    assert warm_fresh_attention(8, 2, 64, 0.125, torch.float32, torch.device("cpu"), 300) == 6
    # Every bucket in both layouts a prompt brings: contiguous (padded) and token-major (a bucket-long prompt).
    assert seen[1:] == [16, 16, 32, 32, 64, 64, 128, 128, 256, 256, 512, 512]
    assert layouts[1:] == [True, False] * 6


@pytest.mark.gpu
@pytest.mark.parametrize("n", [33, 700, 2049])
def test_cuda_bucketed_attention_matches_unpadded(n: int) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, k, v = _qkv(n, "cuda", torch.bfloat16)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    got = fresh_causal_attention(q, k, v, 0.125)
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err < 1e-2, err


def _model(path: str) -> CausalLM:
    return load_model(load_checkpoint(path), torch.device("cpu"), torch.float32)


def _pad_as_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's fresh prompts padded on CPU too, as CUDA pads them."""
    real = attention.fresh_causal_attention
    monkeypatch.setattr(attention, "fresh_causal_attention",
                        lambda q, k, v, scale: real(q, k, v, scale, pad=True))


Layout = tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (shape, strides) of q, k and v


def _record_layouts(monkeypatch: pytest.MonkeyPatch) -> set[Layout]:
    seen: set[Layout] = set()
    real = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.add(tuple((tuple(t.shape), t.stride()) for t in (q, k, v)))
        return real(q, k, v, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def test_every_layout_the_model_brings_is_one_the_warm_up_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN keys its plans by strides too: a prompt that reaches SDPA in a layout the warm-up did not run builds a
    plan while serving. An eager step's v is a view into the fused qkv projection's output (decoder_layer.py), a
    piecewise step's a contiguous buffer (pieces.py); prompts of a bucket's length (16, 32) run unpadded."""
    model = _model("tiny")
    _pad_as_on_cuda(monkeypatch)
    seen = _record_layouts(monkeypatch)
    PagedRunner(model).step({"a": list(range(1, 17)), "b": list(range(1, 41)), "c": list(range(1, 33))})
    prompts = set(seen)
    assert {layout[0][0][2] for layout in prompts} == {16, 32, 64}  # both bucket lengths and a padded one
    seen.clear()
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    warm_fresh_attention(attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale, torch.float32,
                         torch.device("cpu"), 64)
    assert prompts <= seen, prompts - seen


@pytest.mark.parametrize("kind", ["llama_ckpt", "mistral_ckpt", "hybrid_ckpt", "qwen3_ckpt"])
def test_padding_changes_no_logit_of_a_model(kind: str, request: pytest.FixtureRequest,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps as CUDA runs them (fresh prompts padded) give the logits of the unpadded steps: several fresh prompts
    of different lengths in one step (one a bucket's length, one a token past it, one inside the sliding window of
    Mistral (8) and the hybrid's sliding layers (6), padded past it), then a chunk over cached tokens, a decode and
    another fresh prompt beside them."""
    path = str(request.getfixturevalue(kind))
    steps = [{"a": list(range(300, 305)), "b": list(range(100, 116)), "c": list(range(200, 217))},
             {"a": [7], "b": list(range(400, 411)), "d": list(range(450, 483))}]
    model = _model(path)
    plain = PagedRunner(model)
    want = [plain.step(step) for step in steps]
    _pad_as_on_cuda(monkeypatch)
    padded = PagedRunner(model)
    for step, expected in zip(steps, want):
        got = padded.step(step)
        for seq, logits in expected.items():
            torch.testing.assert_close(got[seq], logits, rtol=1e-5, atol=1e-5)
