"""benchmarks/moe_speed.py's expert count: one eager step with the counting router in place (`count_routed`),
run here on CPU against a tiny Qwen3-MoE engine. The count must equal the distinct experts every MoE layer
routes the batch to in that step, and afterwards the plain router and the runner's graphs are back."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import pdlaunch.model.moe.block as moe_block
from pdlaunch.engine.llm import build_config
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.model.moe.router import route

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _moe_speed(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202 (the script's module)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("_bench_moe_speed_count", BENCHMARKS / "moe_speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


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

        monkeypatch.setattr(moe_block, "route", moe_block.route)  # undone after the test, whatever count_routed does
        monkeypatch.setattr(moe_speed, "route", watching)  # what count_routed puts back: the counter calls it too
        counter = moe_speed.RouteCounter(layers, arch.moe.num_experts, torch.device("cpu"))
        graphs, mixed = engine.runner.graphs, engine.runner.mixed
        counted = moe_speed.count_routed(engine, counter)
        assert counter.calls == layers == len(seen)
        assert counted == sum(len(s) for s in seen) > 0
        assert moe_block.route is watching and engine.runner.graphs is graphs and engine.runner.mixed is mixed
    finally:
        engine.shutdown()
