"""The LM head's logits are float32, written so by the kernel that sums them on CUDA (model/vocab_parallel.py)."""

from __future__ import annotations

import pytest
import torch

from pdlaunch.model.vocab_parallel import ParallelLMHead, VocabParallelEmbedding


def _head(vocab: int, hidden: int, dtype: torch.dtype, device: str) -> ParallelLMHead:
    head = ParallelLMHead(vocab, hidden).to(device, dtype)
    torch.manual_seed(1)
    head.weight.data.normal_(0, hidden ** -0.5)
    return head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_logits_are_the_product_then_float32(dtype: torch.dtype) -> None:
    head = _head(300, 64, dtype, "cpu")
    hidden = torch.randn(5, 64).to(dtype)
    logits = head(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (5, 300)
    assert torch.equal(logits, torch.nn.functional.linear(hidden, head.weight).float())


def test_tp_need_not_divide_the_vocabulary() -> None:
    """10 ids over TP 8: shares of 2, the last rank's padding, and ranks 6 and 7 wholly past the table (their
    load raised IndexError). The shares laid end to end are the table padded with zero rows."""
    table = torch.randn(10, 4)
    shares = []
    for rank in range(8):
        embedding = VocabParallelEmbedding(10, 4, tp_rank=rank, tp_size=8)
        embedding.weight_loader(embedding.weight, table)
        shares.append(embedding.weight.data)
    assert torch.equal(torch.cat(shares), torch.cat([table, torch.zeros(6, 4)]))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 2, 64, 130])
def test_cuda_bf16_logits_carry_the_float32_sum_unrounded(rows: int) -> None:
    """One row (the GEMV) and several (cuBLAS): float32 logits within float32 summation error of a float64
    product, and not the bf16 rounding of it (which is 100x further off)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    head = _head(32000, 4096, torch.bfloat16, "cuda")
    hidden = torch.randn(rows, 4096, device="cuda").to(torch.bfloat16)
    logits = head(hidden)
    exact = hidden.double() @ head.weight.double().t()
    assert logits.dtype == torch.float32 and logits.shape == (rows, 32000)
    error = (logits.double() - exact).abs().max().item()
    rounded_error = (logits.to(torch.bfloat16).double() - exact).abs().max().item()
    assert error < 1e-4 * exact.abs().max().item(), error
    assert rounded_error > 10 * error, (error, rounded_error)
