"""A PD decode given the prefill's first token hands that token out on the next step; a request aborted before
that step used to get it anyway (after its abort output), and one re-added under the same id (a retry) received
the old request's token as its own."""

from __future__ import annotations

from pathlib import Path

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from tests.engine.conftest import MakeEngine
from tests.engine.test_engine_connector import CopyConnector, Hub, spec

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _answer(p_engine: LLMEngine) -> RequestOutput:
    p_engine.add_request("leg", PROMPT, GREEDY.model_copy(update={"max_tokens": 1}),
                         kv_transfer_params={"do_remote_decode": True, "return_first_token": True})
    answer: RequestOutput | None = None
    while p_engine.has_unfinished_requests():
        answer = next((o for o in p_engine.step() if o.finished), answer)
    assert answer is not None and answer.kv_transfer_params and "first_token_ids" in answer.kv_transfer_params
    return answer


def _drain(engine: LLMEngine) -> list[RequestOutput]:
    outs: list[RequestOutput] = []
    for _ in range(1000):
        outs.extend(engine.step())
        if engine.is_quiescent():
            return outs
    raise AssertionError("the engine did not go quiescent")


def test_no_first_token_after_an_abort_nor_for_a_request_reusing_the_id(llama_ckpt: Path,
                                                                        make_engine: MakeEngine) -> None:
    hub = Hub()
    p_engine, d_engine = (make_engine(llama_ckpt, instance=spec(role, name), connector=CopyConnector(hub, name))
                          for role, name in (("prefill", "P"), ("decode", "D")))
    answer = _answer(p_engine)
    d_engine.add_request("r", PROMPT, GREEDY, answer.kv_transfer_params)
    aborted = d_engine.abort_request("r")
    assert aborted is not None and aborted.finished and aborted.finish_reason == "abort"
    assert _drain(d_engine) == []  # nothing for "r" after its abort
    d_engine.check_integrity()

    d_engine.add_request("r", PROMPT, GREEDY, answer.kv_transfer_params)
    d_engine.abort_request("r")
    d_engine.add_request("r", PROMPT, GREEDY)  # the retry, computed here
    outs = [o for o in _drain(d_engine) if o.request_id == "r"]
    assert outs[-1].finished and len(outs[-1].output_token_ids) == GREEDY.max_tokens
    assert [t for o in outs for t in o.new_token_ids] == outs[-1].output_token_ids  # no token of the aborted one
    d_engine.check_integrity()
