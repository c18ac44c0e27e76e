"""MoE models at --tp 2 on CPU (gloo): experts split by width (TP) or placed whole per rank (expert
parallel), greedy ids == transformers (Qwen3-MoE with TP-split experts: the prefill of
tests/serving/test_e2e_moe.py). OLMoE's q/k norm spans all heads, so its statistics cross ranks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pdlaunch.engine.outputs import SamplingParams
from tests.engine.conftest import run_all
from tests.engine.test_engine_parity import assert_same_greedy, hf_reference, random_prompts
from tests.tp.conftest import MakeTPEngine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind,expert_parallel", [
    ("qwen3_moe", True), ("olmoe", False), ("qwen2_moe", True), ("mixtral", False)])
def test_tp2_moe_greedy_matches_transformers(kind: str, expert_parallel: bool, moe_ckpt: Callable[[str], Path],
                                             make_tp_engine: MakeTPEngine) -> None:
    path = moe_ckpt(kind)
    prompts = random_prompts([5, 21], seed=4)
    engine = make_tp_engine(path, 2, expert_parallel=expert_parallel, max_num_batched_tokens=16)
    experts = next(layer.mlp.experts for layer in engine.runner.model.model.decoder_layers
                   if hasattr(layer.mlp, "experts"))
    # 4 experts of width 32: EP holds 2 whole experts, TP all 4 at half width.
    assert tuple(experts.w13.shape[:2]) == ((2, 64) if expert_parallel else (4, 32))
    outs = run_all(engine, prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert_same_greedy(out.output_token_ids, hf_reference(path, prompt, GREEDY.max_tokens))
