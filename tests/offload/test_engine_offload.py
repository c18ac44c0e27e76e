"""KV offload through LLMEngine: a hybrid Qwen2 (full + sliding-window groups) with a tiny device
cache spills evicted prefix blocks to the CPU tier and loads them back for a repeated prompt;
greedy outputs stay equal to transformers'. Block integrity is checked after every step and test."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import EngineError
from pdlaunch.offload import metrics
from tests.engine.conftest import MakeEngine, run_all
from tests.helpers.checkpoints import hf_greedy

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
# block_size 4 with window 6: the sliding group keeps only the last 2-3 blocks, so loads start
# its device blocks at a later (and not block-aligned) logical index than the full group's.
OPTIONS = {"block_size": 4, "num_gpu_blocks": 12, "kv_offload_gb": 0.001, "max_num_batched_tokens": 16}


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 500) for _ in range(n)] for n in lengths]


def _hf(path: Path, prompt: list[int]) -> list[int]:
    return hf_greedy(path, prompt, GREEDY.max_tokens)


@pytest.mark.parametrize("fixture", ["hybrid_ckpt", "qwen3_tied_ckpt"])  # both: full + sliding groups
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_repeated_prompt_is_served_from_cpu_tier(device: str, fixture: str, request: pytest.FixtureRequest,
                                                 make_engine: MakeEngine) -> None:
    model = request.getfixturevalue(fixture)
    engine = make_engine(model, device=device, **OPTIONS)
    if device == "cuda":
        assert engine.offload is not None and engine.offload.tier.caches[0].is_pinned()
    assert engine.offload is not None and len(engine.runner.groups) == 2
    prompt = _prompts([30], seed=11)[0]
    reference = _hf(model, prompt)
    loaded_metric = metrics.OFFLOAD_LOADED_BLOCKS._value.get()

    first = run_all(engine, [prompt], GREEDY)[0]
    assert first.output_token_ids == reference
    # Other prompts take every device block, so the first prompt's cached blocks are evicted.
    for flush in _prompts([30, 29, 31], seed=12):
        run_all(engine, [flush], GREEDY)
    assert engine.stats()["offload_stored_blocks"] > 0
    assert engine.block_manager.match_prefix(prompt, len(prompt) - 1).num_tokens == 0

    before = engine.stats()
    again = run_all(engine, [prompt], GREEDY)[0]
    after = engine.stats()
    assert again.output_token_ids == reference
    cpu_blocks = (len(prompt) - 1) // 4  # all full blocks but the one holding the last prompt token
    assert after["offload_hit_blocks"] - before["offload_hit_blocks"] == cpu_blocks
    assert after["offload_loaded_blocks"] - before["offload_loaded_blocks"] == cpu_blocks
    assert after["prompt_tokens_computed"] - before["prompt_tokens_computed"] == len(prompt) - 4 * cpu_blocks
    assert metrics.OFFLOAD_LOADED_BLOCKS._value.get() - loaded_metric >= cpu_blocks
    # The loaded blocks are in the device prefix cache again.
    assert engine.block_manager.match_prefix(prompt, len(prompt) - 1).num_tokens == 4 * cpu_blocks


def test_mixed_prefixes_match_transformers(hybrid_ckpt: Path, make_engine: MakeEngine) -> None:
    """Prompts sharing prefixes of different lengths with evicted ones, batched, with preemption
    pressure: every output equals transformers' and the CPU tier served part of the prompts."""
    engine = make_engine(hybrid_ckpt, **OPTIONS)
    base = _prompts([26, 27, 25], seed=21)
    tails = _prompts([3, 7, 10, 5], seed=22)
    # Prefix lengths 9, 13, 18 and 22 share 2-5 full blocks with a base prompt (unaligned ends).
    variants = [base[0][:9] + tails[0], base[1][:13] + tails[1], base[2][:18] + tails[2], base[0][:22] + tails[3]]
    for p in base:
        run_all(engine, [p], GREEDY)
    flush = _prompts([28, 30, 29], seed=23)
    run_all(engine, flush, GREEDY)
    before = engine.stats()
    outs = run_all(engine, variants + [base[1]], GREEDY)
    for prompt, out in zip(variants + [base[1]], outs):
        assert out.output_token_ids == _hf(hybrid_ckpt, prompt)
    after = engine.stats()
    assert after["offload_loaded_blocks"] > before["offload_loaded_blocks"]
    assert after["prompt_tokens_computed"] - before["prompt_tokens_computed"] < sum(map(len, variants)) + 27


def test_cpu_tier_lru_eviction_keeps_engine_consistent(hybrid_ckpt: Path, make_engine: MakeEngine) -> None:
    """A CPU tier of 8 blocks overflows: old blocks leave it LRU-first, nothing breaks, outputs stay right."""
    opts = dict(OPTIONS, kv_offload_gb=8 * 4096 / 2**30)  # 4 KiB per block in every group together
    engine = make_engine(hybrid_ckpt, **opts)
    assert engine.offload is not None and engine.offload.tier.num_blocks == 8
    prompts = _prompts([30, 29, 28, 31, 30], seed=31)
    for p in prompts:
        run_all(engine, [p], GREEDY)
    assert engine.offload.tier.num_evicted > 0 and engine.offload.tier.num_used_blocks() == 8
    out = run_all(engine, [prompts[0], prompts[-2]], GREEDY)
    assert [o.output_token_ids for o in out] == [_hf(hybrid_ckpt, prompts[0]), _hf(hybrid_ckpt, prompts[-2])]


def test_offload_needs_prefix_caching(hybrid_ckpt: Path, make_engine: MakeEngine) -> None:
    with pytest.raises(EngineError, match="prefix caching") as info:
        make_engine(hybrid_ckpt, **OPTIONS, enable_prefix_caching=False)
    assert info.value.field == "cache.kv_offload_gb"
