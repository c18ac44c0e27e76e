"""A request whose own constraints leave no token to sample (its grammar against allowed_token_ids, bad_words
banning every allowed id, min_tokens holding back the only allowed id) fails with a 400 naming why; it used to
get an arbitrary token (id 0) finished as "stop" or "length". The other requests of the batch are not touched."""

from __future__ import annotations

from pathlib import Path

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.structured_output import StructuredOutput
from tests.engine.conftest import MakeEngine, run_all

DIGITS = StructuredOutput(kind="regex", value="[0-9]+")


def _ids(engine: LLMEngine, keep: str) -> list[int]:
    decode = engine.tokenizer.decode
    return [t for t in range(engine.vocab_size) if decode([t]) and all(c in keep for c in decode([t]))][:4]


def test_constraints_that_allow_no_token_fail_that_request_only(llama_ckpt: Path, make_engine: MakeEngine) -> None:
    engine = make_engine(llama_ckpt)
    letters = _ids(engine, "abcdefghijklmnopqrstuvwxyz")
    eos = engine.tokenizer.eos_token_ids[0]
    plain = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = run_all(engine, [[5, 6, 7]], plain)[0]
    conflicting = [
        SamplingParams(max_tokens=5, temperature=0.0, structured_output=DIGITS, allowed_token_ids=letters),
        SamplingParams(max_tokens=5, temperature=0.9, seed=3, structured_output=DIGITS, allowed_token_ids=letters),
        SamplingParams(max_tokens=5, temperature=0.0, logprobs=2, allowed_token_ids=letters[:1],
                       bad_words=[engine.tokenizer.decode(letters[:1])]),
        SamplingParams(max_tokens=5, temperature=0.0, min_tokens=2, allowed_token_ids=[eos]),
    ]
    outs = run_all(engine, [[5, 6, 7]] * 5, [plain, *conflicting])
    assert (outs[0].output_token_ids, outs[0].text, outs[0].finish_reason) == \
        (alone.output_token_ids, alone.text, alone.finish_reason)
    for out in outs[1:]:
        assert out.finish_reason == "error" and out.error_status == 400, out
        assert out.error is not None and "exclude every token" in out.error
        assert out.new_token_ids == [] and out.new_logprobs is None
    assert outs[4].output_token_ids == [] and outs[3].output_token_ids == []
    engine.check_integrity()


def test_a_token_its_grammar_rejects_fails_the_request(llama_ckpt: Path, make_engine: MakeEngine) -> None:
    """A token not sampled under its grammar here (a PD decode continues from the prefill's first token) and
    that the grammar rejects ends the request with an error naming the field, without that token's text."""
    engine = make_engine(llama_ckpt)
    letter = _ids(engine, "abcdefghijklmnopqrstuvwxyz")[0]
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=5, structured_output=DIGITS))
    request = engine.scheduler.requests["r"]
    appended = engine.outputs.append_token(request, letter)
    assert appended.text == "" and appended.reason == "error" and appended.error_status == 400
    assert appended.error is not None and appended.error.startswith("structured_outputs: the grammar rejected")
    assert "\n" not in appended.error  # llguidance's parser state dump is left out
    assert appended.error_param == "structured_outputs"  # the client's 400 names the field in `param` too
    engine.abort_request("r")


def test_an_engine_error_about_a_field_names_it_in_the_answer_s_param() -> None:
    """The grammar's rejection said its field only in the message text: the 400's `param` was null."""
    from pdlaunch.engine.outputs import RequestOutput
    from pdlaunch.server.request_stream import error_of

    failed = RequestOutput("r", [], "", [], "", finished=True, finish_reason="error", error="structured_outputs: no",
                           error_status=400, error_param="structured_outputs")
    error = error_of(failed)
    assert (error.status, error.param, error.message) == (400, "structured_outputs", "structured_outputs: no")
