"""vllm:request_num_preemptions: each request's output carries the times the scheduler preempted it, and the
histogram observes that count once for every request the engine ended (stop, length, error), never for an abort."""

from __future__ import annotations

import time

from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.metrics.vllm_series import REQUEST_NUM_PREEMPTIONS, vllm
from pdlaunch.server.request_metrics import RequestMetrics
from tests.engine.conftest import MakeEngine, run_all
from tests.engine.test_engine_batching import mixed_prompts


def test_each_output_carries_the_times_its_request_was_preempted(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    # A few blocks of 8 tokens: at most a couple of requests fit at once, the newest are preempted.
    engine = make_engine(llama_ckpt, num_gpu_blocks=10, max_num_batched_tokens=16)
    outs = run_all(engine, mixed_prompts(12, seed=3, max_len=40),
                   SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    preempted = engine.stats()["num_preemptions"]
    assert preempted > 0
    assert sum(o.num_preemptions for o in outs) == preempted


def _histogram() -> tuple[float, float, float]:
    """This process's vllm:request_num_preemptions: its count, sum, and the count in its le=1 bucket."""
    child = vllm(REQUEST_NUM_PREEMPTIONS)
    buckets = [b.get() for b in child._buckets]
    return sum(buckets), child._sum.get(), buckets[0]


def _end(reason: str, num_preemptions: int) -> None:
    request = RequestMetrics("r", "/v1/completions", time.monotonic())
    request.accepted(5)
    request.output(RequestOutput(request_id="r", new_token_ids=[1], new_text="", output_token_ids=[1], text="",
                                 finished=True, finish_reason=reason, num_prompt_tokens=5,
                                 scheduled_at=time.monotonic(), num_preemptions=num_preemptions))


def test_a_request_the_engine_ended_is_observed_with_its_preemptions() -> None:
    count, total, le_1 = _histogram()
    _end("stop", 2)
    _end("length", 0)
    assert _histogram() == (count + 2, total + 2, le_1 + 1)  # 0 falls into the first bucket, 2 above it
    _end("abort", 3)  # its client left: not observed, as vLLM's
    assert _histogram() == (count + 2, total + 2, le_1 + 1)
