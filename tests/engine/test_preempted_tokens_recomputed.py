"""pdlaunch_preempted_tokens_recomputed: positions whose KV a preemption freed count once they are computed again, as
an instance's /metrics shows them (the default registry's exposition, which /metrics answers) beside
vllm:num_preemptions. With prefix caching off every freed position is computed again, so the counter grows by exactly
the positions the preemptions freed; with it on, by less (the cache gives back the freed blocks not reused yet).
Forced as tests/engine/test_request_num_preemptions.py forces preemptions: few blocks, many prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.request import Request
from pdlaunch.metrics.vllm_series import NUM_PREEMPTIONS, vllm
from tests.engine.conftest import MakeEngine, run_all
from tests.engine.test_engine_batching import mixed_prompts


def _exposed() -> dict[str, float]:
    """The two counters as the /metrics body shows them (vllm:num_preemptions in this process's model_name series)."""
    model = vllm(NUM_PREEMPTIONS)._labelvalues[0]
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(generate_latest().decode()):
        for sample in family.samples:
            if sample.name == "pdlaunch_preempted_tokens_recomputed_total" or (
                    sample.name == "vllm:num_preemptions_total" and sample.labels.get("model_name") == model):
                found[sample.name] = sample.value
    assert len(found) == 2, f"missing from /metrics: {found}"
    return found


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_what_a_preemption_freed_counts_as_recomputed_once_computed_again(
        prefix_caching: bool, llama_ckpt: Path, make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    # A few blocks of 8 tokens: at most a couple of requests fit at once, the newest are preempted.
    engine = make_engine(llama_ckpt, num_gpu_blocks=10, max_num_batched_tokens=16,
                         enable_prefix_caching=prefix_caching)
    freed: list[int] = []  # the positions each preemption freed
    preempt = engine.scheduler._preempt

    def noting_what_it_frees(request: Request) -> None:
        freed.append(request.num_computed_tokens)
        preempt(request)

    monkeypatch.setattr(engine.scheduler, "_preempt", noting_what_it_frees)
    before = _exposed()
    outs = run_all(engine, mixed_prompts(12, seed=3, max_len=40),
                   SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    after = _exposed()
    assert all(o.finish_reason == "length" for o in outs)
    assert sum(freed) > 0
    assert after["vllm:num_preemptions_total"] - before["vllm:num_preemptions_total"] == len(freed)
    name = "pdlaunch_preempted_tokens_recomputed_total"
    recomputed = after[name] - before[name]
    if prefix_caching:  # this workload's preempted requests find part of their freed blocks again
        assert 0 < recomputed < sum(freed)
    else:
        assert recomputed == sum(freed)
