"""Batching, prefix caching and preemption never change greedy tokens."""

from __future__ import annotations

import random

import pytest

from pdlaunch.engine.outputs import SamplingParams
from tests.engine.conftest import MakeEngine, run_all

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def mixed_prompts(n: int, seed: int = 0, max_len: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 500) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def tokens(outs) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [o.output_token_ids for o in outs]


def test_32_mixed_prompts_batched_equal_one_at_a_time(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    prompts = mixed_prompts(32)
    single = make_engine(llama_ckpt, max_num_seqs=1, enable_prefix_caching=False)
    batched = make_engine(llama_ckpt, max_num_seqs=32, max_num_batched_tokens=256)
    one_at_a_time = [run_all(single, [p], GREEDY)[0].output_token_ids for p in prompts]
    outs = run_all(batched, prompts, GREEDY)
    assert tokens(outs) == one_at_a_time
    assert max(batched.stats()["num_running"], 0) == 0


# Sliding-window models hold only the window's blocks, so they need a smaller cache to run out.
@pytest.mark.parametrize(("fixture", "num_blocks"), [("llama_ckpt", 10), ("mistral_ckpt", 5), ("hybrid_ckpt", 10)])
def test_prefix_cache_hits_and_preemption_give_the_same_tokens(
    fixture: str, num_blocks: int, request: pytest.FixtureRequest, make_engine: MakeEngine
) -> None:
    path = request.getfixturevalue(fixture)
    shared = mixed_prompts(1, seed=7, max_len=40)[0] + [1] * 30  # a 30+ token common prefix
    prompts = mixed_prompts(12, seed=3, max_len=40) + [shared + p for p in mixed_prompts(6, seed=4, max_len=12)]
    reference = tokens(run_all(make_engine(path, enable_prefix_caching=False), prompts, GREEDY))

    cached = make_engine(path)
    assert tokens(run_all(cached, prompts, GREEDY)) == reference
    again = run_all(cached, prompts, GREEDY)
    assert tokens(again) == reference
    assert all(o.num_cached_tokens > 0 for o, p in zip(again, prompts) if len(p) > 8)
    assert cached.stats()["prompt_tokens_cached"] > 0

    # A few blocks of 8 tokens: at most a couple of requests fit at once.
    tiny = make_engine(path, num_gpu_blocks=num_blocks, max_num_batched_tokens=16)
    assert tokens(run_all(tiny, prompts, GREEDY)) == reference
    assert tiny.stats()["num_preemptions"] > 0
