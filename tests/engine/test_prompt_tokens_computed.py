"""pdlaunch_prompt_tokens_computed counts the prompt tokens an instance computed, not those it planned to compute at
admission: a PD decode whose KV load failed computed its last prompt token never (load_failure_policy fail) or its
whole prompt (recompute), and one aborted while its KV was on the way computed none. Through two engines joined by the
in-process connector of test_engine_connector; /info's stats.prompt_tokens_computed must agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.kv_transfer.base import KVConnectorEvents
from pdlaunch.metrics.instance import PROMPT_TOKENS_COMPUTED
from tests.engine.conftest import MakeEngine
from tests.engine.test_engine_connector import CopyConnector, Hub, prefill, spec

PROMPT = list(range(3, 23))  # 20 tokens
GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


def _computed(engine: LLMEngine) -> tuple[float, int]:
    """(the counter, the stats' value): the counter is process-wide, so tests read deltas."""
    return PROMPT_TOKENS_COMPUTED._value.get(), engine.stats()["prompt_tokens_computed"]


def _decode(d_engine: LLMEngine, p_out: RequestOutput) -> RequestOutput:
    d_engine.add_request("d", PROMPT, GREEDY, p_out.kv_transfer_params)
    for _ in range(1000):
        for out in d_engine.step():
            if out.finished:
                return out
        d_engine.check_integrity()
    raise AssertionError("the decode request did not end within 1000 engine steps")


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_failed_kv_load_counts_only_the_prompt_tokens_computed_here(
    policy: str, llama_ckpt: Path, make_engine: MakeEngine
) -> None:
    hub = Hub()
    p_engine = make_engine(llama_ckpt, instance=spec("prefill", "P"), connector=CopyConnector(hub, "P"))
    d_engine = make_engine(llama_ckpt, instance=spec("decode", "D"), connector=CopyConnector(hub, "D", fail=True))
    d_engine.scheduler.recompute_failed_loads = policy == "recompute"  # kv_transfer.load_failure_policy
    (p_out,) = prefill(p_engine, [PROMPT])
    counter, stats = _computed(d_engine)

    out = _decode(d_engine, p_out)

    assert out.finish_reason == ("length" if policy == "recompute" else "error"), out.error
    computed = len(PROMPT) if policy == "recompute" else 0  # the whole prompt here, or nothing: no load came
    assert d_engine.stats()["prompt_tokens_computed"] - stats == computed
    assert PROMPT_TOKENS_COMPUTED._value.get() - counter == computed
    hub.notices["P"] = {p_out.request_id}  # the prefill's lease, by hand
    p_engine.step()


def test_a_decode_aborted_while_its_kv_loads_counts_no_prompt_token(llama_ckpt: Path, make_engine: MakeEngine) -> None:
    hub = Hub()
    p_engine = make_engine(llama_ckpt, instance=spec("prefill", "P"), connector=CopyConnector(hub, "P"))
    d_conn = CopyConnector(hub, "D")
    d_engine = make_engine(llama_ckpt, instance=spec("decode", "D"), connector=d_conn)
    (p_out,) = prefill(p_engine, [PROMPT])
    counter, stats = _computed(d_engine)
    d_conn.get_finished = lambda: KVConnectorEvents()  # type: ignore[method-assign]  # the load never completes
    d_engine.add_request("d", PROMPT, GREEDY, p_out.kv_transfer_params)
    d_engine.step()
    assert d_engine.stats()["num_waiting_for_kv"] == 1

    out = d_engine.abort_request("d")

    assert out is not None and out.finish_reason == "abort"
    assert _computed(d_engine) == (counter, stats)
    p_engine.step()
