"""--tp 2 on two GPUs (NCCL): greedy ids == transformers in float32. Needs 2 CUDA devices."""

from __future__ import annotations

import pytest
import torch

from pdlaunch.engine.outputs import SamplingParams
from tests.engine.conftest import run_all
from tests.engine.test_engine_parity import assert_same_greedy, hf_reference, random_prompts
from tests.tp.conftest import MakeTPEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="TP 2 on GPUs needs two CUDA devices"),
]


@pytest.mark.parametrize("fixture", ["llama_ckpt", "one_kv_head_ckpt", "qwen3_tied_ckpt", "llama32_ckpt"])
def test_tp2_nccl_greedy_matches_transformers(fixture: str, request: pytest.FixtureRequest,
                                              make_tp_engine: MakeTPEngine) -> None:
    path = request.getfixturevalue(fixture)
    prompts = random_prompts([7, 30], seed=5)
    engine = make_tp_engine(path, 2, device="cuda", max_num_batched_tokens=16)
    assert engine.runner.kv_caches[0].is_cuda and engine.runner.tp_size == 2
    outs = run_all(engine, prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert_same_greedy(out.output_token_ids, hf_reference(path, prompt, 8))
