"""The MoE router kernel (model/moe/router.py) against its torch version: same experts, same weights.

Kernel cases run on "cuda" (gpu marker) and on CPU tensors under TRITON_INTERPRET=1 (in a child pytest,
as in test_fused_ops.py); the torch version is replaced by a failing function there, so a silent
fallback cannot compare it with itself.
"""

from __future__ import annotations

import pytest
import torch

from pdlaunch.model.moe import router
from pdlaunch.model.moe.router import ROUTER_GEMV_MAX_TOKENS, route, route_torch, router_logits
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


@pytest.mark.gpu
def test_router_replays_in_a_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("PDLAUNCH_FUSED_OPS", raising=False)
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
    run_interpreter_child(__file__, "interpret", "30 passed")
