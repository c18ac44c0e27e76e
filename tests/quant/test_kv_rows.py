"""The KV cache's row gather (model/quant/kv_cache.read_rows): what advanced indexing gives, in every cache dtype,
for the 1-D rows of a prefill's cached context and the 2-D rows of a decode batch."""

from __future__ import annotations

import pytest
import torch

from pdlaunch.model.quant import kv_cache as fp8_kv
from pdlaunch.model.quant.fp8 import FP8_DTYPE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8_DTYPE])
@pytest.mark.parametrize("shape", [(37,), (3, 16), (2, 5, 4)])
def test_read_rows_equals_advanced_indexing(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    cache = torch.randn(6, 2, 2, 8, 4, 16, generator=gen).to(dtype)  # blocks, layers, k/v, block size, heads, dim
    flat = cache.view(-1, 4, 16)
    rows = torch.randint(0, flat.shape[0], shape, generator=gen)
    got = fp8_kv.read_rows(flat, rows)
    want = flat.view(torch.uint8)[rows] if dtype == FP8_DTYPE else flat[rows]
    assert got.dtype == dtype and got.shape == (*shape, 4, 16)
    assert torch.equal(got.view(torch.uint8) if dtype == FP8_DTYPE else got, want)
