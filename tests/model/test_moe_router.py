"""The MoE router kernel (model/moe/router.py) against its torch version: same experts, same weights.

Kernel cases run on "cuda" (gpu marker) and on CPU tensors under TRITON_INTERPRET=1 (in a child pytest,
as in test_fused_ops.py); the torch version is replaced by a failing function there, so a silent
fallback cannot compare it with itself.
"""

from __future__ import annotations

import pytest
import torch

from pdlaunch.model import fused_norm
from pdlaunch.model.moe import router
from pdlaunch.model.moe.router import (
    ROUTER_GEMV_MAX_TOKENS,
    norm_and_route,
    norm_route_available,
    route,
    route_torch,
    router_logits,
)
from tests.model.interpreter import INTERPRET_AT_START, run_interpreter_child


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "interpret"])
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    pytest.importorskip("triton")
    monkeypatch.delenv("PDLAUNCH_FUSED_OPS", raising=False)
    if request.param == "interpret" and not INTERPRET_AT_START:
        pytest.skip("runs in the child of test_interpreter_cases_in_a_subprocess")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    def fail(*args: object) -> None:
        raise AssertionError("the torch router ran: the kernel case fell back")

    monkeypatch.setattr(router, "route_torch", fail)
    return "cuda" if request.param == "cuda" else "cpu"


@pytest.mark.parametrize("tokens,experts,top_k", [(5, 60, 8), (3, 128, 8), (4, 8, 2), (2, 16, 1), (0, 64, 4)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_router_matches_torch(device: str, tokens: int, experts: int, top_k: int, renormalize: bool,
                              dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(experts * 10 + top_k)
    logits = (torch.randn(tokens, experts, generator=gen) * 3).to(dtype).to(device)
    weights, ids = route(logits, top_k, renormalize)
    want_weights, want_ids = route_torch(logits.cpu(), top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (tokens, top_k)
    # The same probabilities picked, best first; among equal ones (bf16 logits tie often) any expert will do,
    # each once. torch.topk orders ties as it likes, the kernel by id.
    probs = torch.softmax(logits.cpu().float(), dim=-1)
    assert torch.equal(probs.gather(1, ids.cpu()), probs.gather(1, want_ids))
    assert all(len(set(row)) == top_k for row in ids.tolist())
    if dtype == torch.float32:
        assert torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(weights.cpu(), want_weights, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("tokens,experts,hidden", [(1, 128, 2048), (5, 60, 96), (16, 8, 4096), (3, 64, 5000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_router_product_matches_linear(device: str, monkeypatch: pytest.MonkeyPatch, tokens: int, experts: int,
                                       hidden: int, dtype: torch.dtype) -> None:
    """The router's own product at decode batch sizes (the Triton launch; F.linear must not run) against
    F.linear in float64, to the rounding of the output dtype (hidden 5000: a partial last chunk)."""
    gen = torch.Generator().manual_seed(tokens * 7 + experts)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w = (torch.randn(experts, hidden, generator=gen) * hidden**-0.5).to(dtype)

    def fail(*args: object) -> None:
        raise AssertionError("F.linear ran: the kernel case fell back")

    monkeypatch.setattr(router.F, "linear", fail)
    out = router_logits(x.to(device), w.to(device))
    assert out.dtype == dtype and out.shape == (tokens, experts)
    want = x.double() @ w.double().t()
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.cpu().double(), want, rtol=tol, atol=tol)


def test_router_product_above_the_gemv_batch_is_linear(device: str) -> None:
    x = torch.randn(ROUTER_GEMV_MAX_TOKENS + 1, 64, device=device)
    w = torch.randn(16, 64, device=device)
    assert torch.equal(router_logits(x, w), torch.nn.functional.linear(x, w))


def test_equal_probabilities_go_to_the_lower_expert(device: str) -> None:
    logits = torch.zeros(2, 12, device=device)
    logits[1, 7] = logits[1, 3] = 5.0  # two best, equal: 3 before 7, then the rest by id
    weights, ids = route(logits, 4, True)
    assert ids.cpu().tolist() == [[0, 1, 2, 3], [3, 7, 0, 1]]
    assert torch.allclose(weights.sum(-1).cpu(), torch.ones(2))


# 60 experts: one a program (block_e 1), so 60 programs a token, each with the whole norm; 2 tokens, not 5, take
# the same path (several tokens' programs) at 2/5 of the interpreter's time
@pytest.mark.parametrize("tokens,experts,hidden,top_k", [(1, 128, 2048, 8), (2, 60, 96, 4), (16, 8, 4096, 2),
                                                         (3, 64, 300, 6)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_and_route_is_the_norm_then_the_router(device: str, monkeypatch: pytest.MonkeyPatch, tokens: int,
                                                    experts: int, hidden: int, top_k: int, dtype: torch.dtype) -> None:
    """The post-attention RMSNorm of o + residual folded into the router's product: the residual stream equal to
    the norm kernel's, the normed rows within one rounding of it (its sum of squares may add in another order),
    and the logits those rows give equal to router_logits' (the norm's own launch must not run)."""
    gen = torch.Generator().manual_seed(tokens * 17 + hidden)
    o, residual = (torch.randn(tokens, hidden, generator=gen).to(dtype).to(device) for _ in range(2))
    norm_weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(device)
    w = (torch.randn(experts, hidden, generator=gen) * hidden**-0.5).to(dtype).to(device)
    assert norm_route_available(o, residual, w)
    want_y, want_residual = fused_norm.fused_add_rms_norm(o, residual, norm_weight, 1e-6)
    picked: list[torch.Tensor] = []

    def watching(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        picked.append(logits)
        return route(logits, k, renormalize)

    def fail(*args: object) -> None:
        raise AssertionError("the norm ran as a launch of its own")

    with monkeypatch.context() as patched:
        patched.setattr(router, "route", watching)
        patched.setattr(fused_norm, "_rms_norm_launch", fail)
        y, new_residual, weights, ids = norm_and_route(o, residual, norm_weight, 1e-6, w, top_k, True)
    assert torch.equal(new_residual, want_residual)
    if dtype == torch.float32:
        torch.testing.assert_close(y, want_y, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(y.float(), want_y.float(), rtol=2**-7, atol=1e-6)  # a bf16 ulp at most
    assert len(picked) == 1 and torch.equal(picked[0], router_logits(y, w))
    want_weights, want_ids = route(picked[0], top_k, True)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_weights)


def test_norm_and_route_only_at_a_decode_batch(device: str) -> None:
    """Above ROUTER_GEMV_MAX_TOKENS tokens the norm and the router's product are launches of their own (the MoE
    block's norm_into then gives the norm's rows); norm_and_route refuses what it cannot fold."""
    tokens = ROUTER_GEMV_MAX_TOKENS + 1
    o, residual = torch.randn(tokens, 64, device=device), torch.randn(tokens, 64, device=device)
    w = torch.randn(16, 64, device=device)
    assert not norm_route_available(o, residual, w)
    assert norm_route_available(o[:ROUTER_GEMV_MAX_TOKENS], residual[:ROUTER_GEMV_MAX_TOKENS], w)
    assert not norm_route_available(o[:2], residual[:2], w.to(torch.float16))
    with pytest.raises(ValueError, match="check norm_route_available first"):
        norm_and_route(o, residual, torch.ones(64, device=device), 1e-6, w, 4, True)
    with pytest.raises(ValueError, match="norm weight"):
        norm_and_route(o[:2], residual[:2], torch.ones(32, device=device), 1e-6, w, 4, True)


@pytest.mark.parametrize("tokens", [3, ROUTER_GEMV_MAX_TOKENS + 1])
def test_moe_block_takes_its_routing_from_the_folded_norm(device: str, tokens: int) -> None:
    """SparseMoeBlock.norm_into at a decode batch hands the block its rows already routed (router.norm_and_route),
    and the block's output equals the norm then the block routing itself; above the batch it gives the rows."""
    from pdlaunch.model.moe.block import Routed, SparseMoeBlock
    from pdlaunch.model.moe.config import MoeArch
    from pdlaunch.model.rms_norm import RMSNorm

    torch.manual_seed(5)
    hidden = 64
    block = SparseMoeBlock(MoeArch(num_experts=8, top_k=2, expert_intermediate_size=32, norm_topk_prob=True,
                                   sparse_layers=[True]), hidden).to(device)
    norm = RMSNorm(hidden, 1e-6).to(device)
    with torch.no_grad():
        for param in [*block.parameters(), *norm.parameters()]:
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if param is norm.weight else 0.0))
    o, residual = torch.randn(tokens, hidden, device=device), torch.randn(tokens, hidden, device=device)
    x, new_residual = block.norm_into(norm, o, residual)
    want_x, want_residual = norm(o, residual)
    assert isinstance(x, Routed) == (tokens <= ROUTER_GEMV_MAX_TOKENS)
    assert torch.equal(new_residual, want_residual)
    torch.testing.assert_close(block(x), block(want_x), rtol=1e-5, atol=1e-5)


def _cuda_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("PDLAUNCH_FUSED_OPS", raising=False)


@pytest.mark.gpu
def test_norm_and_route_replays_in_a_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Captured once, replayed with new rows: equal to the same launches run eagerly."""
    _cuda_kernels(monkeypatch)
    torch.manual_seed(3)
    dt = torch.bfloat16
    o, residual = torch.randn(2, 2048, device="cuda", dtype=dt), torch.randn(2, 2048, device="cuda", dtype=dt)
    norm_weight = torch.ones(2048, device="cuda", dtype=dt)
    w = (torch.randn(128, 2048, device="cuda") * 0.02).to(dt)
    norm_and_route(o, residual, norm_weight, 1e-6, w, 8, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = norm_and_route(o, residual, norm_weight, 1e-6, w, 8, True)
    for seed in range(3):
        torch.manual_seed(10 + seed)
        o.copy_(torch.randn_like(o))
        residual.copy_(torch.randn_like(residual))
        graph.replay()
        want = norm_and_route(o, residual, norm_weight, 1e-6, w, 8, True)
        torch.cuda.synchronize()
        for got, expected in zip(outs, want, strict=True):
            assert torch.equal(got, expected)


@pytest.mark.gpu
def test_router_replays_in_a_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda_kernels(monkeypatch)
    logits = torch.randn(4, 128, device="cuda")  # float32: no ties, so the ids compare exactly
    route(logits, 8, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = route(logits, 8, True)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    want_weights, want_ids = route_torch(logits, 8, True)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=2e-6, atol=1e-7)


def test_cpu_without_the_interpreter_runs_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    if INTERPRET_AT_START:
        pytest.skip("the interpreter runs the kernel on CPU")
    calls: list[int] = []

    def counted(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(top_k)
        return route_torch(logits, top_k, renormalize)

    monkeypatch.setattr(router, "route_torch", counted)
    logits = torch.randn(3, 20)
    weights, ids = route(logits, 4, False)
    want_weights, want_ids = route_torch(logits, 4, False)
    assert calls == [4], "CPU without the interpreter must take the torch router"
    assert torch.equal(weights, want_weights) and torch.equal(ids, want_ids)


@pytest.mark.slow
def test_interpreter_cases_in_a_subprocess() -> None:
    run_interpreter_child(__file__, "interpret", "41 passed")
