"""Chunked prefill: a step token budget changes when tokens are computed, never which tokens come out."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.config.engine_config import DECODE_TOKEN_BUDGET, PROMPT_TOKEN_BUDGET, SchedulerConfig
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.scheduler_output import SchedulerOutput
from tests.engine.conftest import MakeEngine, run_all
from tests.engine.test_engine_batching import mixed_prompts, tokens
from tests.engine.test_engine_connector import spec

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_the_step_token_budget_defaults_by_role_and_a_set_value_wins() -> None:
    unset = SchedulerConfig()
    assert unset.token_budget("colocated") == unset.token_budget("prefill") == PROMPT_TOKEN_BUDGET
    assert unset.token_budget("decode") == DECODE_TOKEN_BUDGET < PROMPT_TOKEN_BUDGET
    assert all(SchedulerConfig(max_num_batched_tokens=96).token_budget(r) == 96 for r in ("colocated", "prefill"))


def _recorded_steps(engine: LLMEngine) -> list[SchedulerOutput]:
    """Every schedule the engine runs from now on."""
    steps: list[SchedulerOutput] = []
    schedule = engine.scheduler.schedule

    def recording() -> SchedulerOutput:
        out = schedule()
        steps.append(out)
        return out

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    return steps


def test_chunked_prefill_gives_the_unchunked_tokens_with_prefix_caching(llama_ckpt: Path,
                                                                       make_engine: MakeEngine) -> None:
    shared = mixed_prompts(1, seed=11, max_len=40)[0] + [3] * 40  # a prefix longer than any chunk
    prompts = mixed_prompts(6, seed=5, max_len=70) + [shared + p for p in mixed_prompts(4, seed=6, max_len=20)]
    unchunked = make_engine(llama_ckpt, max_num_batched_tokens=4096, enable_prefix_caching=False)
    reference = tokens(run_all(unchunked, prompts, GREEDY))
    assert make_engine(llama_ckpt).scheduler.max_num_batched_tokens == PROMPT_TOKEN_BUDGET  # the defaults
    for role, budget in (("prefill", PROMPT_TOKEN_BUDGET), ("decode", DECODE_TOKEN_BUDGET)):
        assert make_engine(llama_ckpt, instance=spec(role, role)).scheduler.max_num_batched_tokens == budget

    chunked = make_engine(llama_ckpt, max_num_batched_tokens=24, max_num_seqs=8)
    steps = _recorded_steps(chunked)
    assert tokens(run_all(chunked, prompts, GREEDY)) == reference
    assert max(s.num_batched_tokens for s in steps) <= 24
    # decodes and a prompt chunk shared steps, the decodes first
    mixed = [s for s in steps if {x.num_new_tokens == 1 for x in s.scheduled} == {True, False}]
    assert mixed
    for s in mixed:
        kinds = [x.num_new_tokens == 1 and x.start >= x.request.num_prompt_tokens for x in s.scheduled]
        assert kinds == sorted(kinds, reverse=True), "a prompt chunk ran before a decode of its step"
    again = run_all(chunked, prompts, GREEDY)  # now from the prefix cache, still chunked
    assert tokens(again) == reference
    assert sum(o.num_cached_tokens for o in again) > 0


@pytest.mark.parametrize("overlapped", [False, True])
def test_prompts_beside_decodes_run_in_capped_chunks_with_the_same_tokens(llama_ckpt: Path, make_engine: MakeEngine,
                                                                         overlapped: bool) -> None:
    """--prompt-tokens-while-decoding: a step that runs a decode computes at most that many prompt tokens; a step
    with none takes the whole budget; the tokens are those of unchunked steps, with the host's work overlapped
    (async scheduling, the default with CUDA: a request's pending token makes it a decode) or not."""
    from pdlaunch.config.engine_config import PROMPT_TOKENS_WHILE_DECODING

    prompts = mixed_prompts(8, seed=21, max_len=90)
    reference = tokens(run_all(make_engine(llama_ckpt, prompt_tokens_while_decoding=0, enable_prefix_caching=False),
                               prompts, GREEDY))
    assert make_engine(llama_ckpt).scheduler.prompt_tokens_while_decoding == PROMPT_TOKENS_WHILE_DECODING
    engine = make_engine(llama_ckpt, max_num_batched_tokens=256, prompt_tokens_while_decoding=12, max_num_seqs=8,
                         enable_prefix_caching=False, async_scheduling=overlapped)
    assert engine.async_scheduling == overlapped
    steps = _recorded_steps(engine)
    # staggered arrivals, so prompts come while others decode
    outputs = {}
    pending = [(f"cap-{i}", p) for i, p in enumerate(prompts)]
    while pending or engine.has_unfinished_requests():
        if pending:
            rid, prompt = pending.pop(0)
            engine.add_request(rid, prompt, GREEDY)
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    assert tokens([outputs[f"cap-{i}"] for i in range(len(prompts))]) == reference

    def prompt_tokens(step: SchedulerOutput) -> int:
        return sum(x.num_new_tokens for x in step.scheduled if x.start < x.request.num_prompt_tokens)

    with_decodes = [s for s in steps if any(x.start >= x.request.num_prompt_tokens for x in s.scheduled)]
    assert with_decodes and all(prompt_tokens(s) <= 12 for s in with_decodes)
    assert any(prompt_tokens(s) == 12 for s in with_decodes)  # the cap was reached, not just never needed
    assert max(prompt_tokens(s) for s in steps) > 12  # a step with no decode took more
