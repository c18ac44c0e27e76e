"""A fresh prompt's causal attention at its length bucket (model/fresh_attention.py): the buckets, padding that
changes no real row, and the warm-up that builds every bucket a step can meet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdlaunch.model.fresh_attention import bucket, buckets, fresh_causal_attention, warm_fresh_attention


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
