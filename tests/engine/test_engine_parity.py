"""Greedy token ids through the engine == transformers greedy ids, float32 on CPU."""

from __future__ import annotations

import random

import pytest

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.model.demo_tokenizer import EOS_TOKEN_ID
from tests.engine.conftest import MakeEngine, run_all
from tests.helpers.checkpoints import hf_greedy

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def hf_reference(path, prompt: list[int], max_tokens: int) -> list[int]:  # type: ignore[no-untyped-def]
    """transformers' greedy ids. Its generate() may stop at EOS even when asked not to (the
    checkpoint's generation_config leaks in): then only the ids up to that EOS are the reference."""
    ids = hf_greedy(path, prompt, max_tokens)
    assert len(ids) == max_tokens or ids[-1] == EOS_TOKEN_ID
    return ids


def assert_same_greedy(ours: list[int], reference: list[int]) -> None:
    assert ours[:len(reference)] == reference


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 500) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("fixture", ["llama_ckpt", "qwen2_ckpt", "mistral_ckpt", "hybrid_ckpt", "sharded_ckpt",
                                     "qwen3_ckpt", "qwen3_tied_ckpt", "llama32_ckpt"])
def test_greedy_matches_transformers(fixture: str, request: pytest.FixtureRequest, make_engine: MakeEngine) -> None:
    path = request.getfixturevalue(fixture)
    prompts = random_prompts([5, 19, 33])  # 19 and 33 are longer than the mistral/hybrid windows
    # A 16-token budget chunks the long prompts, so cached-context prefill runs too.
    engine = make_engine(path, max_num_batched_tokens=16)
    outs = run_all(engine, prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.finish_reason == "length"
        assert_same_greedy(out.output_token_ids, hf_reference(path, prompt, GREEDY.max_tokens))


def test_unchunked_prefill_matches_transformers(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    prompts = random_prompts([3, 40], seed=1)
    outs = run_all(make_engine(llama_ckpt), prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert_same_greedy(out.output_token_ids, hf_reference(llama_ckpt, prompt, 10))
