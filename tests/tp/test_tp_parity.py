"""--tp 2 colocated: greedy ids == transformers, with KV heads split and with one KV head replicated."""

from __future__ import annotations

import pytest

from pdlaunch.engine.outputs import SamplingParams
from tests.engine.conftest import run_all
from tests.engine.test_engine_parity import assert_same_greedy, hf_reference, random_prompts
from tests.tp.conftest import MakeTPEngine

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["llama_ckpt", "qwen2_ckpt", "one_kv_head_ckpt", "qwen3_tied_ckpt", "llama32_ckpt"])
def test_tp2_greedy_matches_transformers(fixture: str, request: pytest.FixtureRequest,
                                         make_tp_engine: MakeTPEngine) -> None:
    path = request.getfixturevalue(fixture)
    prompts = random_prompts([5, 21], seed=3)
    # A 16-token budget chunks the 21-token prompt, so prefill over cached context runs on both ranks.
    engine = make_tp_engine(path, 2, max_num_batched_tokens=16)
    assert engine.runner.tp_size == 2 and engine.runner.num_kv_heads == 1
    outs = run_all(engine, prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.finish_reason == "length"
        assert_same_greedy(out.output_token_ids, hf_reference(path, prompt, GREEDY.max_tokens))
    engine.check_integrity()
    assert engine.block_manager.num_used_blocks() == 0
