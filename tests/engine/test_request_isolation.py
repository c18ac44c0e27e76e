"""One request's own per-request work raising inside a step (its grammar's mask or advance, its bad words'
tokenization, its detokenizer) ends that request with a 500 error, gives its KV blocks back, and leaves every
other request of the batch exactly as it would be alone; the engine steps on (random Llama checkpoint, CPU)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pdlaunch.engine import output_processor
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.engine.structured_output import StructuredOutput
from tests.engine.conftest import MakeEngine, run_all
from tests.engine.test_engine_connector import CopyConnector, Hub, spec

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7]
CHOICES = json.dumps(["alpha", "beta gamma", "delta"])


class Boom(RuntimeError):
    """The injected failure of one request's hook."""


def greedy(**kw: Any) -> SamplingParams:
    kw.setdefault("max_tokens", 10)
    kw.setdefault("ignore_eos", True)
    return SamplingParams(temperature=0.0, **kw)


def choice() -> SamplingParams:
    return greedy(max_tokens=20, ignore_eos=False,
                  structured_output=StructuredOutput(kind="choice", value=CHOICES))


@pytest.fixture
def engine(make_engine: MakeEngine, llama_ckpt: Path) -> LLMEngine:
    return make_engine(llama_ckpt, max_num_seqs=8)


def run_batch(engine: LLMEngine, requests: dict[str, SamplingParams], break_one: Callable[[], None]) -> \
        dict[str, RequestOutput]:
    """Add `requests` (all in one batch), `break_one()`, then step to the end, checking integrity every step."""
    for rid, params in requests.items():
        engine.add_request(rid, PROMPT, params)
    break_one()
    final: dict[str, RequestOutput] = {}
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            return final
        final.update((out.request_id, out) for out in engine.step() if out.finished)
        engine.check_integrity()
    raise AssertionError("the engine made no progress in 1000 steps")


def run_to_end(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Step until every request finished (a prefill may still hold KV for its decode); their final outputs."""
    final: dict[str, RequestOutput] = {}
    for _ in range(1000):
        final.update((out.request_id, out) for out in engine.step() if out.finished)
        if not engine.has_unfinished_requests():
            return final
    raise AssertionError("the engine made no progress in 1000 steps")


def assert_isolated(engine: LLMEngine, final: dict[str, RequestOutput], alone: dict[str, RequestOutput],
                    free_before: int) -> None:
    bad = final.pop("bad")
    assert bad.finished and bad.finish_reason == "error" and bad.error_status == 500, bad
    assert bad.error is not None and "Boom" in bad.error and "injected" in bad.error
    for rid, out in alone.items():
        assert final[rid].finish_reason == out.finish_reason, rid
        assert (final[rid].output_token_ids, final[rid].text) == (out.output_token_ids, out.text), rid
    assert engine.block_manager.num_free_blocks() == free_before
    assert run_all(engine, [PROMPT], greedy())[0].finish_reason == "length"  # the engine serves on


@pytest.mark.parametrize("overlap", [False, True])
def test_a_detokenizer_that_raises_fails_only_its_request(make_engine: MakeEngine, llama_ckpt: Path,
                                                          overlap: bool) -> None:
    """Also with async scheduling, where the token is taken a step later, while the next step is launched."""
    engine = make_engine(llama_ckpt, max_num_seqs=8, async_scheduling=overlap)
    assert engine.async_scheduling == overlap
    free = engine.block_manager.num_free_blocks()
    plain, stopping = greedy(), greedy(stop=["zz"], max_tokens=6)
    alone = dict(zip(("plain", "stopping"), run_all(engine, [PROMPT, PROMPT], [plain, stopping])))

    def break_one() -> None:
        def decode(ids: object) -> str:
            raise Boom("injected decode failure")

        engine.outputs.tracked["bad"].detokenizer._decode = decode

    final = run_batch(engine, {"plain": plain, "bad": greedy(), "stopping": stopping}, break_one)
    assert_isolated(engine, final, alone, free)


def test_bad_words_that_cannot_be_tokenized_fail_only_their_request(engine: LLMEngine) -> None:
    free = engine.block_manager.num_free_blocks()
    plain, processed = greedy(), greedy(repetition_penalty=1.5, bad_words=["abc"])
    alone = dict(zip(("plain", "processed"), run_all(engine, [PROMPT, PROMPT], [plain, processed])))
    processors = engine.sampler.processors
    encode = processors._encode
    assert encode is not None

    def raising(text: str) -> list[int]:
        if "boom" in text:
            raise Boom("injected bad_words failure")
        return encode(text)

    final = run_batch(engine, {"plain": plain, "bad": greedy(bad_words=["boom"]), "processed": processed},
                      lambda: setattr(processors, "_encode", raising))
    assert_isolated(engine, final, alone, free)


@pytest.mark.parametrize("hook", ["mask", "advance"])
def test_a_grammar_that_raises_fails_only_its_request(engine: LLMEngine, hook: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import llguidance.torch as llt

    free = engine.block_manager.num_free_blocks()
    alone = dict(zip(("plain", "constrained"), run_all(engine, [PROMPT, PROMPT], [greedy(), choice()])))
    assert alone["constrained"].text in json.loads(CHOICES)
    fill, advance = llt.fill_next_token_bitmask, output_processor.advance

    def break_one() -> None:
        bad = engine.outputs.tracked["bad"].matcher

        def raising_fill(matcher: Any, mask: Any, row: int) -> None:
            if matcher is bad:
                raise Boom("injected grammar mask failure")
            fill(matcher, mask, row)

        def raising_advance(matcher: Any, token_id: int) -> bool:
            if matcher is bad:
                raise Boom("injected grammar advance failure")
            return bool(advance(matcher, token_id))

        if hook == "mask":
            monkeypatch.setattr(llt, "fill_next_token_bitmask", raising_fill)
        else:
            monkeypatch.setattr(output_processor, "advance", raising_advance)

    final = run_batch(engine, {"plain": greedy(), "bad": choice(), "constrained": choice()}, break_one)
    assert_isolated(engine, final, alone, free)


def test_a_first_token_that_cannot_be_taken_leaves_no_request_behind(make_engine: MakeEngine, llama_ckpt: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A PD decode takes the prefill's first token inside add_request: when that raises, add_request's caller gets
    the error (the client's refusal), so the request must not stay queued to run unseen with its id taken."""
    hub = Hub()
    p_engine, d_engine = (make_engine(llama_ckpt, instance=spec(role, name), connector=CopyConnector(hub, name))
                          for role, name in (("prefill", "P"), ("decode", "D")))
    p_engine.add_request("leg", PROMPT, greedy(max_tokens=1),
                         kv_transfer_params={"do_remote_decode": True, "return_first_token": True})
    legs = run_to_end(p_engine)
    answer = legs["leg"].kv_transfer_params
    assert answer is not None and "first_token_ids" in answer
    free = d_engine.block_manager.num_free_blocks()

    def decode(*args: object, **kwargs: object) -> str:
        raise Boom("injected decode failure")

    monkeypatch.setattr(d_engine.outputs, "decode", decode)
    with pytest.raises(Boom):
        d_engine.add_request("r", PROMPT, greedy(), answer)
    assert not d_engine.has_unfinished_requests() and "r" not in d_engine.outputs.tracked
    assert d_engine.is_quiescent() and d_engine.block_manager.num_free_blocks() == free
    monkeypatch.undo()
    d_engine.add_request("r", PROMPT, greedy())  # the client's retry under the same id, computed here
    retried = run_to_end(d_engine)["r"]
    assert retried.finish_reason == "length" and len(retried.output_token_ids) == 10
