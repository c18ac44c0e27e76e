"""The one-row Triton GEMV (model/gemv.py) against float64, and where the linear layers use it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdlaunch.model.gemv import gemv, gemv_available
from pdlaunch.model.parallel_linear import ColumnParallelLinear
from pdlaunch.model.vocab_parallel import ParallelLMHead

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("n,k,bias", [(4096, 4096, False), (5120, 2048, True), (1003, 777, True), (7, 4096, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_equals_float64_within_the_dtype_and_replays_in_a_graph(n: int, k: int, bias: bool,
                                                                       dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
    b = torch.randn(n, device="cuda").to(dtype) if bias else None
    x = torch.randn(1, k, device="cuda").to(dtype)
    want = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    got = gemv(x, w, b)
    assert got.shape == (1, n) and got.dtype == dtype
    # float32 accumulation, one rounding to the dtype at the end: within half an ulp of the result's scale
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err < 2 ** -8
    cublas = F.linear(x, w, b)
    assert ((got.double() - want).norm() / want.norm()) <= 1.5 * ((cublas.double() - want).norm() / want.norm())
    out = torch.empty_like(got)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(gemv(x, w, b))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, gemv(x, w, b), atol=0, rtol=0)


@cuda
def test_linear_layers_take_the_gemv_for_one_row_only(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = ColumnParallelLinear(256, 384, bias=False).to("cuda", torch.bfloat16)
    layer.weight.data.normal_(0, 0.02)
    one, two = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16), torch.randn(2, 256, device="cuda",
                                                                                       dtype=torch.bfloat16)
    assert gemv_available(one, layer.weight) and not gemv_available(two, layer.weight)
    torch.testing.assert_close(layer(one), gemv(one, layer.weight), atol=0, rtol=0)
    monkeypatch.setenv("PDLAUNCH_GEMV", "cublas")
    assert not gemv_available(one, layer.weight)
    torch.testing.assert_close(layer(one), F.linear(one, layer.weight), atol=0, rtol=0)


@cuda
def test_the_lm_head_takes_the_gemv_for_one_row() -> None:
    head = ParallelLMHead(1000, 256).to("cuda", torch.bfloat16)
    head.weight.data.normal_(0, 0.02)
    one = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(head(one), gemv(one, head.weight, out_dtype=torch.float32), atol=0, rtol=0)
    three = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(head(three), torch.mm(three, head.weight.t(), out_dtype=torch.float32), atol=0, rtol=0)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_inside_the_gemv_equals_silu_and_mul_then_the_gemv(dtype: torch.dtype) -> None:
    from pdlaunch.model.fused_ops import silu_and_mul

    torch.manual_seed(0)
    inter, hidden = 1000, 384
    w = (torch.randn(hidden, inter, device="cuda") * 0.02).to(dtype)
    gate_up = (torch.randn(1, 2 * inter, device="cuda") * 3).to(dtype)
    torch.testing.assert_close(gemv(gate_up, w, silu_mul=True), gemv(silu_and_mul(gate_up), w), atol=0, rtol=0)
    # a float32 output keeps silu(gate) * up rounded to the input's dtype
    torch.testing.assert_close(gemv(gate_up, w, silu_mul=True, out_dtype=torch.float32),
                               gemv(silu_and_mul(gate_up), w, out_dtype=torch.float32), atol=0, rtol=0)
    with pytest.raises(ValueError, match="columns"):
        gemv(gate_up[:, :inter], w, silu_mul=True)


@cuda
def test_the_mlp_of_one_row_multiplies_silu_inside_the_down_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    from pdlaunch.model.parallel_linear import RowParallelLinear

    torch.manual_seed(0)
    down = RowParallelLinear(512, 256, bias=True).to("cuda", torch.bfloat16)
    down.weight.data.normal_(0, 0.02)
    down.bias.data.normal_(0, 0.02)
    gate_up = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    assert down.takes_gate_up(gate_up) and not down.takes_gate_up(torch.cat([gate_up, gate_up]))
    from pdlaunch.model.fused_ops import silu_and_mul

    torch.testing.assert_close(down.forward_silu_mul(gate_up), down(silu_and_mul(gate_up)), atol=0, rtol=0)
    monkeypatch.setenv("PDLAUNCH_FUSED_OPS", "torch")  # the torch reference silu: no fused path
    assert not down.takes_gate_up(gate_up)
