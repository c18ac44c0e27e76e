"""A prefix hit in the CPU offload tier counts as a hit once its load did not fail: vllm:prefix_cache_hits, the
request's cached tokens (usage, and vllm:prompt_tokens_cached and vllm:prompt_tokens_by_source{local_cache_hit} as the
server counts them from its outputs), the stats' prompt_tokens_cached and pdlaunch_kv_offload_hit_blocks. A load that
failed while copying counts none of its tokens as hits anywhere (they were counted when the load was queued): its
request ends with an error, its prompt counted as left to compute, and none of it as computed
(pdlaunch_prompt_tokens_computed and the stats' prompt_tokens_computed: it never ran). Through LLMEngine, a hybrid
Qwen2 with a tiny device cache, as tests/offload/test_engine_offload.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import RequestOutput
from pdlaunch.metrics.instance import PROMPT_TOKENS_COMPUTED
from pdlaunch.metrics.vllm_series import (
    PREFIX_CACHE_HITS,
    PREFIX_CACHE_QUERIES,
    PROMPT_TOKENS_BY_SOURCE,
    PROMPT_TOKENS_CACHED,
    vllm,
)
from pdlaunch.offload import metrics as offload_metrics
from pdlaunch.server.request_metrics import EngineTokens
from tests.engine.conftest import MakeEngine, run_all
from tests.helpers.offload_tier import loads_fail_while_copying
from tests.offload.test_engine_offload import GREEDY, OPTIONS, _prompts


def _counts(engine: LLMEngine) -> dict[str, float]:
    stats = engine.stats()
    return {"queries": vllm(PREFIX_CACHE_QUERIES)._value.get(),
            "hits": vllm(PREFIX_CACHE_HITS)._value.get(),
            "local_cache_hit": vllm(PROMPT_TOKENS_BY_SOURCE, source="local_cache_hit")._value.get(),
            "local_compute": vllm(PROMPT_TOKENS_BY_SOURCE, source="local_compute")._value.get(),
            "cached": vllm(PROMPT_TOKENS_CACHED)._value.get(),
            "stats_cached": stats["prompt_tokens_cached"],
            "tier_hit_blocks": offload_metrics.OFFLOAD_HIT_BLOCKS._value.get(),
            "stats_hit_blocks": stats["offload_hit_blocks"],
            "computed": PROMPT_TOKENS_COMPUTED._value.get(),
            "stats_computed": stats["prompt_tokens_computed"]}


def _serve(engine: LLMEngine, prompt: list[int]) -> RequestOutput:
    """Step the engine until the request of `prompt` ends; each output counted as the server's engine thread does."""
    tokens = EngineTokens()
    engine.add_request("cpu-hit", prompt, GREEDY)
    for _ in range(1000):
        for out in engine.step():
            tokens.output(out)
            if out.finished:
                return out
        engine.check_integrity()
    raise AssertionError("the request did not end within 1000 engine steps")


@pytest.mark.parametrize("load_fails", [False, True], ids=["loaded", "load-failed"])
def test_a_cpu_tier_hit_counts_once_its_load_did_not_fail(load_fails: bool, hybrid_ckpt: Path,
                                                          make_engine: MakeEngine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(hybrid_ckpt, **OPTIONS)
    offload, bm = engine.offload, engine.block_manager
    assert offload is not None
    prompt = _prompts([30], seed=61)[0]
    run_all(engine, [prompt], GREEDY)
    for flush in _prompts([30, 29, 31], seed=62):  # evicts the prompt's blocks to the CPU tier
        run_all(engine, [flush], GREEDY)
    usable = len(prompt) - 1
    device_hit = bm.match_prefix(prompt, usable)
    cpu_hit = offload.match(prompt, device_hit, usable)
    assert cpu_hit is not None and cpu_hit.blocks
    if load_fails:
        loads_fail_while_copying(offload, monkeypatch)
    failed_loads = offload_metrics.OFFLOAD_FAILED_JOBS.labels("load")._value.get()
    before = _counts(engine)

    out = _serve(engine, prompt)

    assert out.finish_reason == ("error" if load_fails else "length"), out.error
    assert offload_metrics.OFFLOAD_FAILED_JOBS.labels("load")._value.get() - failed_loads == int(load_fails)
    hit = device_hit.num_tokens + (0 if load_fails else cpu_hit.num_tokens - device_hit.num_tokens)
    tier_blocks = 0 if load_fails else len(cpu_hit.blocks)
    computed = 0 if load_fails else len(prompt) - hit
    assert out.num_cached_tokens == hit
    delta = {key: value - before[key] for key, value in _counts(engine).items()}
    assert delta == {"queries": len(prompt), "hits": hit, "local_cache_hit": hit, "local_compute": len(prompt) - hit,
                     "cached": hit, "stats_cached": hit, "tier_hit_blocks": tier_blocks,
                     "stats_hit_blocks": tier_blocks, "computed": computed, "stats_computed": computed}
