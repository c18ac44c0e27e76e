"""benchmarks/moe_speed.py's expert count: one eager step with the counting router in place (`count_routed`),
run here on CPU against a tiny Qwen3-MoE engine. The count must equal the distinct experts every MoE layer
routes the batch to in that step, and afterwards the router in place before and the runner's graphs are back.
--ablate's stand-ins replace the kernels where the model calls them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

import pdlaunch.model.moe.block as moe_block
from pdlaunch.engine.llm import build_config
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.model.moe.router import route
from tests.helpers.benchmark_scripts import BENCHMARKS, load_benchmark


def _moe_speed(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_benchmark(BENCHMARKS / "moe_speed.py", "_bench_moe_speed_count", monkeypatch)


def test_count_routed_counts_one_eager_step_and_puts_the_router_back(
        moe_ckpt: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    moe_speed = _moe_speed(monkeypatch)
    path = moe_ckpt("qwen3_moe")
    engine = LLMEngine(build_config(str(path), "cpu", "float32", {"max_num_seqs": 4, "enable_prefix_caching": False}))
    try:
        arch = engine.checkpoint.arch
        assert arch.moe is not None
        layers = sum(isinstance(m, moe_block.SparseMoeBlock) for m in engine.runner.model.modules())
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        for i in range(3):
            engine.add_request(f"r{i}", [5 + i, 9, 11 + i, 3], params)
        for _ in range(2):  # the prompts, then a decode step of all three
            engine.step()
        seen: list[set[int]] = []

        def watching(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
            weights, ids = route(logits, top_k, renormalize)
            seen.append(set(ids.reshape(-1).tolist()))
            return weights, ids

        before, folded = moe_block.route, moe_block.norm_route_available
        for name in ("route", "norm_route_available"):  # undone after the test, whatever count_routed does
            monkeypatch.setattr(moe_block, name, getattr(moe_block, name))
        monkeypatch.setattr(moe_speed, "route", watching)  # the counter routes through it
        counter = moe_speed.RouteCounter(layers, arch.moe.num_experts, torch.device("cpu"))
        graphs, mixed = engine.runner.graphs, engine.runner.mixed
        counted = moe_speed.count_routed(engine, counter)
        assert counter.calls == layers == len(seen)
        assert counted == sum(len(s) for s in seen) > 0
        assert moe_block.route is before and moe_block.norm_route_available is folded
        assert engine.runner.graphs is graphs and engine.runner.mixed is mixed
    finally:
        engine.shutdown()


def test_ablations_take_their_kernels_out_of_every_step(moe_ckpt: Callable[[str], Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--ablate: the originals are replaced where the model calls them, so an engine step on CPU (rotary, router
    experts and the residual norms; the paged decode is CUDA's) never reaches them, and the fixed routing is what
    the experts get. The attention stand-in returns the decode rows of q."""
    import pdlaunch.model.attention as attention
    import pdlaunch.model.decoder_layer as decoder_layer
    import pdlaunch.model.fused_norm as fused_norm
    import pdlaunch.model.fused_rotary as fused_rotary
    import pdlaunch.model.moe.experts as moe_experts
    import pdlaunch.model.moe.fused as moe_fused
    import pdlaunch.model.moe.router as moe_router
    import pdlaunch.model.rms_norm as rms_norm

    moe_speed = _moe_speed(monkeypatch)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("an ablated kernel ran")

    for module, name in [(attention, "paged_decode"), (decoder_layer, "rotary_write_kv"), (moe_block, "router_logits"),
                         (moe_block, "route"), (moe_block, "norm_route_available"), (moe_experts, "fused_moe"),
                         (rms_norm, "fused_add_rms_norm")]:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    for module, name in [(fused_rotary, "rotary_write_kv"), (moe_fused, "fused_moe"), (moe_router, "route"),
                         (moe_router, "router_logits"), (moe_block, "norm_and_route"),
                         (fused_norm, "fused_add_rms_norm")]:
        monkeypatch.setattr(module, name, fail)  # a call path the ablation missed would reach these
    engine = LLMEngine(build_config(str(moe_ckpt("qwen3_moe")), "cpu", "float32",
                                    {"max_num_seqs": 4, "enable_prefix_caching": False}))
    try:
        arch = engine.checkpoint.arch
        assert arch.moe is not None
        moe_speed.ablate(["attention", "rotary", "router", "experts", "norms"], 8, arch.moe.top_k, arch.moe.num_experts,
                         arch.hidden_size, torch.float32, torch.device("cpu"))
        assert not moe_block.norm_route_available(torch.zeros(3, arch.hidden_size), None, None)
        weights, ids = moe_block.route(moe_block.router_logits(torch.zeros(3, arch.hidden_size), None), 2, True)
        assert ids.shape == (3, arch.moe.top_k) and all(len(set(row)) == arch.moe.top_k for row in ids.tolist())
        assert torch.allclose(weights.sum(-1), torch.ones(3))
        weights, ids = moe_block.route(moe_block.router_logits(torch.zeros(11, arch.hidden_size), None), 2, True)
        assert ids.shape == (11, arch.moe.top_k)  # longer than the tables (warm-up steps): made anew
        rows = moe_experts.fused_moe(torch.zeros(11, arch.hidden_size), None, summed=False)
        assert rows.shape == (11, arch.moe.top_k, arch.hidden_size) and not rows.any()
        q = torch.randn(2, arch.num_heads, arch.head_dim)
        assert torch.equal(attention.paged_decode(q, None, 0, torch.zeros(2), None, None, None, 1.0), q)
        residual = torch.randn(2, arch.hidden_size)
        assert all(t is residual for t in rms_norm.fused_add_rms_norm(torch.zeros(2, 2), residual, None, 1e-6))
        engine.add_request("r", [5, 9, 11, 3], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        steps = 0
        while engine.has_unfinished_requests() and steps < 20:
            engine.step()
            steps += 1
        assert not engine.has_unfinished_requests()
    finally:
        engine.shutdown()
    with pytest.raises(SystemExit, match="unknown"):
        moe_speed.ablate(["layernorm"], 1, 2, 8, 16, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_random_model_stands_in_for_the_runners_load(moe_ckpt: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch,
                                                     kv_cache_dtype: str) -> None:
    """moe_speed.py puts `random_model` in the runner's place of `load_model`: the runner's call must fit it (a
    keyword added to load_model's call once broke every run of the script on a GPU host with a TypeError)."""
    import pdlaunch.runner.model_runner as model_runner

    moe_speed = _moe_speed(monkeypatch)
    monkeypatch.setattr(model_runner, "load_model", moe_speed.random_model)
    path = moe_ckpt("qwen3_moe")
    engine = LLMEngine(build_config(str(path), "cpu", "float32", {
        "max_num_seqs": 2, "enable_prefix_caching": False, "kv_cache_dtype": kv_cache_dtype}))
    try:
        engine.add_request("r0", [5, 9, 11, 3], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        for _ in range(2):
            engine.step()
        norms = [p for n, p in engine.runner.model.named_parameters() if n.endswith("norm.weight")]
        assert norms and all(bool((p == 1.0).all()) for p in norms)  # random_model's weights, not the checkpoint's
    finally:
        engine.shutdown()
