"""Structured output in a real engine (random Llama checkpoint, CPU): 20 random JSON schemas in one
batch all give JSON that validates; regex, choice and grammar outputs match; unconstrained
requests of the same batch are untouched."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.structured_output import StructuredOutput, apply_grammar_masks, check
from pdlaunch.errors import EngineError
from tests.engine.conftest import MakeEngine, run_all

PROMPT = [5, 6, 7, 8, 9, 10]


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """Objects of bounded leaves (so that a random model finishes them within max_tokens)."""
    leaves: list[dict[str, Any]] = [
        {"type": "string", "maxLength": rng.randint(1, 6)},
        {"type": "integer", "minimum": 0, "maximum": rng.choice([9, 99, 999])},
        {"type": "boolean"},
        {"enum": rng.sample(["red", "green", "blue", "cyan"], 2)},
        {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        {"type": "null"},
    ]
    props = {}
    for i in range(rng.randint(1, 4)):
        nested = depth < 1 and rng.random() < 0.25
        props[f"f{depth}{i}"] = random_schema(rng, depth + 1) if nested else rng.choice(leaves)
    return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}


def constrained(kind: str, value: str, **kw: Any) -> SamplingParams:
    kw.setdefault("max_tokens", 160)
    kw.setdefault("temperature", 0.0)
    return SamplingParams(structured_output=StructuredOutput(kind=kind, value=value), **kw)  # type: ignore[arg-type]


@pytest.fixture
def engine(make_engine: MakeEngine, llama_ckpt: Path):  # type: ignore[no-untyped-def]
    return make_engine(llama_ckpt, max_num_seqs=24, num_gpu_blocks=512)


@pytest.mark.slow
def test_twenty_random_schemas_validate_in_one_batch(engine) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    schemas = [random_schema(rng) for _ in range(20)]
    params = [constrained("json", json.dumps(s), temperature=rng.choice([0.0, 1.0]), seed=i)
              for i, s in enumerate(schemas)]
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = run_all(engine, [PROMPT] * 21, [*params, plain])
    for schema, out in zip(schemas, outs):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    assert outs[-1].output_token_ids == run_all(engine, [PROMPT], plain)[0].output_token_ids


def test_regex_choice_grammar_and_json_object(engine) -> None:  # type: ignore[no-untyped-def]
    close = engine.tokenizer.encode("}", add_special_tokens=False)
    assert len(close) == 1
    regex, choice, grammar, obj = run_all(engine, [PROMPT] * 4, [
        constrained("regex", r"[a-c]{2,4}-\d\d"),
        constrained("choice", json.dumps(["alpha", "beta gamma"]), temperature=1.0, seed=3),
        constrained("grammar", 'root ::= "yes" | "no" | "maybe"'),
        # A random model writes object keys forever; "}" favoured ends the object when the grammar allows.
        constrained("json_object", "", logit_bias={close[0]: 50}),
    ])
    assert re.fullmatch(r"[a-c]{2,4}-\d\d", regex.text), regex.text
    assert choice.text in ("alpha", "beta gamma")
    assert grammar.text in ("yes", "no", "maybe")
    assert obj.text.startswith("{") and isinstance(json.loads(obj.text), dict)


def test_bad_grammars_are_refused_naming_the_field() -> None:
    for kind, value in (("regex", "a(b"), ("json", '{"type": "nonsense"}'), ("grammar", "root ::= (")):
        with pytest.raises(ValueError, match="structured_outputs"):
            check(StructuredOutput(kind=kind, value=value))  # type: ignore[arg-type]


def test_the_engine_refuses_a_grammar_it_cannot_build(engine) -> None:  # type: ignore[no-untyped-def]
    spec = StructuredOutput.model_construct(kind="regex", value="a(b", field="guided_regex")
    with pytest.raises(EngineError) as info:
        engine.add_request("bad-grammar", PROMPT, SamplingParams(structured_output=spec))
    assert info.value.field == "guided_regex"


def test_masks_leave_unconstrained_rows_alone() -> None:
    logits = torch.randn(3, 70)

    class OnlyToken5:
        def is_stopped(self) -> bool:
            return False

    import llguidance.torch as llt

    original = llt.fill_next_token_bitmask

    def fill(matcher: Any, mask: torch.Tensor, row: int) -> None:
        mask[row] = 0
        mask[row, 0] = 1 << 5

    llt.fill_next_token_bitmask = fill  # type: ignore[assignment]
    try:
        out = apply_grammar_masks(logits, [None, OnlyToken5(), None])
    finally:
        llt.fill_next_token_bitmask = original  # type: ignore[assignment]
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [5]
    assert apply_grammar_masks(logits, [None, None, None]) is logits


def test_a_tokenizer_llguidance_cannot_use_fails_the_request_not_the_engine() -> None:
    from pdlaunch.engine.structured_output import GrammarBackend

    backend = GrammarBackend(lambda: "not a tokenizer.json", 100, None)  # built in its thread at once
    with pytest.raises(EngineError) as info:
        backend.matcher(StructuredOutput(kind="regex", value="a+", field="guided_regex"))
    assert info.value.field == "guided_regex" and "cannot use this tokenizer" in info.value.message


def test_limit_errors_are_told_from_rejected_tokens(engine) -> None:  # type: ignore[no-untyped-def]
    """A grammar past llguidance's limits says so (probe, and the output processor's message); a token the grammar
    does not allow is a rejected token, not a limit."""
    from pdlaunch.engine.grammar_limits import byte_matcher, is_limit_error, probe

    too_large = probe(byte_matcher(StructuredOutput(kind="regex", value="a{1000000}").grammar()))
    assert too_large is not None and is_limit_error(too_large), too_large
    assert probe(byte_matcher(StructuredOutput(kind="regex", value="a{1000}").grammar())) is None
    matcher = engine.outputs.grammar_matcher(StructuredOutput(kind="regex", value="b+"))
    matcher.consume_token(engine.tokenizer.encode("a", add_special_tokens=False)[0])
    assert matcher.is_error() and not is_limit_error(matcher.get_error().splitlines()[0]), matcher.get_error()


def test_a_json_schema_sent_as_text_that_is_no_object_says_so() -> None:
    # structured_outputs.json / guided_json may be a string: "true" is a schema (any JSON) and compiles; a list, a
    # number or text that is not JSON was "Expecting object schema to apply options" or a bare decoder message
    assert check(StructuredOutput(kind="json", value="true", field="guided_json"))
    for text, said in (("[1]", "must be a JSON object (or true / false), not a list"),
                       ("3", "must be a JSON object (or true / false), not a number"),
                       ("{'a': 1}", "is not JSON")):
        with pytest.raises(ValueError, match=re.escape(f"guided_json: the JSON schema {said}")):
            check(StructuredOutput(kind="json", value=text, field="guided_json"))
    with pytest.raises(ValueError, match=r"guided_json: Unsatisfiable schema: schema is false"):
        check(StructuredOutput(kind="json", value="false", field="guided_json"))


def test_a_grammar_that_cannot_be_followed_reads_as_a_sentence() -> None:
    # was "the grammar is cannot be followed in its first output bytes"
    with pytest.raises(ValueError) as caught:
        check(StructuredOutput(kind="json", value='{"$ref": "#"}', field="guided_json"))
    assert "guided_json: the grammar cannot be followed in its first output bytes" in str(caught.value)
    assert "smaller" not in str(caught.value)  # not a size: a smaller grammar would not help


def test_a_json_schema_text_nested_past_the_parser_says_how_deep_it_may_nest() -> None:
    # was "guided_json: maximum recursion depth exceeded while decoding a JSON array", as if the server had failed
    with pytest.raises(ValueError, match=r"^guided_json: the schema nests deeper than 64 levels$"):
        check(StructuredOutput(kind="json", value="[" * 100_000 + "]" * 100_000, field="guided_json"))


def test_a_chain_of_definitions_too_long_to_close_is_refused_saying_so() -> None:
    # 400 definitions, each an allOf member of the one before: closing them recursed past Python's limit, and the
    # request was a 400 "maximum recursion depth exceeded while calling a Python object"
    chain = {f"d{i}": {"properties": {f"p{i}": {"type": "integer"}}, "allOf": [{"$ref": f"#/$defs/d{i + 1}"}]}
             for i in range(400)}
    schema = {"type": "object", "properties": {"a": {}}, "allOf": [{"$ref": "#/$defs/d0"}],
              "$defs": {**chain, "d400": {"properties": {"end": {}}}}}
    with pytest.raises(ValueError) as refused:
        check(StructuredOutput(kind="json", value=json.dumps(schema), field="guided_json"))
    assert str(refused.value).startswith("guided_json: its allOf / anyOf / oneOf members refer to definitions")
    assert "recursion" not in str(refused.value)
