"""The causal mask of a chunk over cached context: on CPU a boolean lower-right mask, which gives SDPA outputs equal
bit for bit to torch's causal_lower_right (what CUDA uses)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from pdlaunch.model.attention import causal_lower_right_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("q_len", "k_len"), [(1, 9), (5, 13), (16, 16), (64, 300)])
def test_the_cpu_mask_equals_torchs_lower_right_causal_bias(q_len: int, k_len: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(q_len * 1000 + k_len)
    q = torch.randn(1, 4, q_len, 32, generator=gen).to(dtype)
    k = torch.randn(1, 2, k_len, 32, generator=gen).to(dtype)
    v = torch.randn(1, 2, k_len, 32, generator=gen).to(dtype)
    mask = causal_lower_right_mask(q_len, k_len, q.device)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    assert mask.sum().item() == sum(k_len - q_len + i + 1 for i in range(q_len))  # query i sees keys up to its own
    ours = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q_len, k_len), scale=0.2,
                                            enable_gqa=True)
    assert torch.equal(ours, theirs)
