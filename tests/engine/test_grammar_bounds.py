"""What a request may ask llguidance to compile (engine/grammar_size.py), and how it is compiled
(engine/grammar_stack.py, engine/grammar_limits.py):

- A JSON object of 13,000 optional keys (a 400 KB schema) passed the check after 8-14 s of a server thread (llguidance
  compiles an object in time that grows as the square of its keys), and the engine's grammar thread compiled it again.
- 300 patternProperties (10 KB) took 9 s: llguidance compares every pair of an object's patterns.
- A chain of 1,000 `$ref`s (76 KB), or of ~2,700 Lark rules, overflowed a thread's 8 MiB stack inside llguidance:
  SIGSEGV, the whole server gone.
- A grammar of more than 65,525 symbols passed the check (validate_grammar takes it; building a matcher panics) and
  failed on the engine after as long a compile.
- The check compiled every grammar twice (validate_grammar, then a matcher over single bytes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import llguidance
import pytest

from pdlaunch.engine import grammar_size
from pdlaunch.engine.grammar_size import (
    MAX_GRAMMAR_CHARS,
    MAX_OBJECT_PATTERNS,
    MAX_OBJECT_PROPERTIES,
    MAX_SCHEMA_PATTERNS,
    MAX_SCHEMA_PROPERTIES,
    check_schema_size,
)
from pdlaunch.engine.grammar_stack import on_grammar_stack
from pdlaunch.engine.schema_refs import SchemaError
from pdlaunch.engine.structured_output import StructuredOutput, check
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.structured_fields import structured_output_of


def _object(keys: int, prefix: str = "k", required: bool = False) -> dict[str, Any]:
    names = [f"{prefix}{i}" for i in range(keys)]
    schema = {"type": "object", "properties": {n: {"type": "string"} for n in names}}
    return {**schema, "required": names} if required else schema


def _patterns(count: int, prefix: str = "x") -> dict[str, Any]:
    return {"type": "object", "patternProperties": {f"^{prefix}{i}_[a-z]+$": {"type": "string"} for i in range(count)}}


class _NoCompiles:
    """llguidance.LLMatcher, failing the test where a grammar is compiled."""

    def __call__(self, *_: Any, **__: Any) -> Any:
        raise AssertionError("a matcher was built")

    def validate_grammar(self, *_: Any, **__: Any) -> Any:
        raise AssertionError("a grammar was validated")

    def __getattr__(self, name: str) -> Any:
        return getattr(_REAL_MATCHER, name)


_REAL_MATCHER = llguidance.LLMatcher


def test_an_object_of_13000_optional_keys_is_a_400_before_anything_is_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llguidance, "LLMatcher", _NoCompiles())
    asked = {"type": "json_schema", "json_schema": {"name": "big", "schema": _object(13_000)}}
    with pytest.raises(OpenAIError) as refused:
        structured_output_of(asked, None, {})
    assert refused.value.status == 400
    assert refused.value.param == "response_format.json_schema.schema.properties"
    assert "13,000 properties in one object; at most 1,000" in refused.value.message, refused.value.message


@pytest.mark.parametrize(("schema", "where"), [
    ({"type": "object", "properties": {"a": _object(MAX_OBJECT_PROPERTIES + 1)}}, "f.properties.a.properties"),
    # `required` names the object does not list are keys llguidance compiles too
    ({"anyOf": [{}, {"type": "object", "required": [f"r{i}" for i in range(MAX_OBJECT_PROPERTIES + 1)]}]},
     "f.anyOf.1.properties"),
    ({"$defs": {"d": _object(MAX_OBJECT_PROPERTIES + 1)}, "$ref": "#/$defs/d"}, "f.$defs.d.properties"),
    ({"type": "object", "properties": {f"o{i}": _object(MAX_OBJECT_PROPERTIES, f"o{i}_")
                                       for i in range(MAX_SCHEMA_PROPERTIES // MAX_OBJECT_PROPERTIES)}}, "f"),
    ({"items": _patterns(MAX_OBJECT_PATTERNS + 1)}, "f.items.patternProperties"),
    ({"prefixItems": [_patterns(MAX_OBJECT_PATTERNS, f"p{i}_")
                      for i in range(MAX_SCHEMA_PATTERNS // MAX_OBJECT_PATTERNS + 1)]}, "f"),
], ids=["object", "required-names", "definition", "in-all", "patterns", "patterns-in-all"])
def test_a_schema_past_a_bound_names_where(schema: dict[str, Any], where: str) -> None:
    with pytest.raises(SchemaError) as refused:
        check_schema_size(schema, "f")
    assert refused.value.field == where, refused.value


def test_a_schema_at_the_bounds_passes() -> None:
    check_schema_size({"type": "object", "properties": {"a": _object(MAX_OBJECT_PROPERTIES - 1, required=True),
                                                        "b": _patterns(MAX_OBJECT_PATTERNS)}}, "f")
    # Keys and patterns sit in schema keywords: an enum or const value that looks like a schema is data.
    check_schema_size({"enum": [_object(MAX_OBJECT_PROPERTIES + 1)], "const": _patterns(MAX_SCHEMA_PATTERNS + 1)}, "f")


def test_a_schema_the_size_of_fhirs_is_served() -> None:
    """FHIR's schema, the largest in common use: 626 definitions of 8,502 properties (all optional but the
    resourceType that names a resource), 253 in the largest object, a root anyOf over its resources. Written here as
    its shape, not its text (2.1 MB)."""
    def definition(i: int, keys: int) -> dict[str, Any]:
        properties: dict[str, Any] = {"resourceType": {"const": f"D{i}"}}
        properties.update({f"p{j}": {"$ref": f"#/definitions/D{(i + j + 1) % 626}"} if j % 4 == 0
                           else {"type": "string"} for j in range(keys - 1)})
        return {"type": "object", "properties": properties, "required": ["resourceType"]}

    definitions = {f"D{i}": definition(i, 253 if i == 0 else 13) for i in range(626)}
    schema = {"definitions": definitions, "anyOf": [{"$ref": f"#/definitions/D{i}"} for i in range(0, 626, 4)]}
    assert sum(len(d["properties"]) for d in definitions.values()) > 8_000
    check(StructuredOutput(kind="json", value=json.dumps(schema), field="guided_json"))


def test_grammar_text_is_bounded_and_the_schemas_it_holds_too() -> None:
    with pytest.raises(ValueError, match=f"guided_regex: {MAX_GRAMMAR_CHARS + 1:,} characters"):
        check(StructuredOutput(kind="regex", value="a" * (MAX_GRAMMAR_CHARS + 1), field="guided_regex"))
    lark = f"start: \"<\" body \">\"\nbody: %json {json.dumps(_patterns(MAX_OBJECT_PATTERNS + 1))}"
    with pytest.raises(SchemaError) as refused:
        check(StructuredOutput(kind="grammar", value=lark, field="guided_grammar"))
    assert refused.value.field == "guided_grammar.%json.patternProperties"
    check(StructuredOutput(kind="grammar", value=f"start: %json {json.dumps(_object(3, required=True))}"))


def test_a_grammar_llguidance_cannot_build_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """16,000 optional keys in 8 objects: past 65,525 grammar symbols, a panic where a matcher is built (reached
    here with the key bounds lifted)."""
    monkeypatch.setattr(grammar_size, "MAX_OBJECT_PROPERTIES", 10**6)
    monkeypatch.setattr(grammar_size, "MAX_SCHEMA_PROPERTIES", 10**6)
    schema = {"type": "object", "properties": {f"o{i}": _object(2_000, f"o{i}_") for i in range(8)}}
    with pytest.raises(ValueError, match="guided_json: the grammar is too large: llguidance cannot build it"):
        check(StructuredOutput(kind="json", value=json.dumps(schema), field="guided_json", open_objects=True))


class _CountingCompiles:
    """llguidance.LLMatcher, counting its compiles (a matcher built, a grammar validated)."""

    def __init__(self) -> None:
        self.real = llguidance.LLMatcher
        self.compiles = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.compiles += 1
        return self.real(*args, **kwargs)

    def validate_grammar(self, *args: Any, **kwargs: Any) -> Any:
        self.compiles += 1
        return self.real.validate_grammar(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_the_check_compiles_a_grammar_once(monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _CountingCompiles()
    monkeypatch.setattr(llguidance, "LLMatcher", counting)
    check(StructuredOutput(kind="json", value=json.dumps(_object(5, required=True))))
    assert counting.compiles == 1
    # A grammar naming a special token a byte tokenizer lacks: validated without a tokenizer, not probed.
    check(StructuredOutput(kind="grammar", value='start: <|im_end|> "a"'))
    assert counting.compiles == 3


_DEEP_CHAINS = textwrap.dedent("""
    import json, threading
    from pdlaunch.engine.structured_output import GrammarBackend, StructuredOutput, check
    from pdlaunch.model.demo_tokenizer import EOS_TOKEN_ID, VOCAB_SIZE, build_demo_tokenizer

    defs = {f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(3000)}
    defs["d3000"] = {"type": "integer"}
    refs = StructuredOutput(kind="json", value=json.dumps({"$defs": defs, "$ref": "#/$defs/d0"}))
    rules, size = ["start: r0"], 0
    while size < %(max_chars)d - 40:  # the densest chain of rules the text bound lets through
        rules.append(f'r{len(rules) - 1}: "x" r{len(rules)}?')
        size += len(rules[-1]) + 1
    rules.append(f'r{len(rules) - 1}: "y"')
    lark = StructuredOutput(kind="grammar", value="\\n".join(rules))
    tokenizer = build_demo_tokenizer().to_str()
    backend = GrammarBackend(lambda: tokenizer, VOCAB_SIZE, EOS_TOKEN_ID)

    def run():  # a thread of the default stack, as the server's are
        for spec in (refs, lark):
            check(spec)
            assert not backend.matcher(spec).is_error()
        print("compiled", len(rules), "rules")

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
""")


def test_deep_chains_of_refs_and_rules_do_not_overflow_a_threads_stack() -> None:
    """In a process of its own: a stack overflow is SIGSEGV."""
    ran = subprocess.run([sys.executable, "-c", _DEEP_CHAINS % {"max_chars": MAX_GRAMMAR_CHARS}],
                         cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0 and "compiled" in ran.stdout, (ran.returncode, ran.stderr[-2000:])


def test_on_grammar_stack_returns_raises_and_times_out() -> None:
    before = threading.stack_size()
    assert on_grammar_stack(lambda: 7) == 7
    with pytest.raises(KeyError):
        on_grammar_stack(lambda: {}["missing"])
    release = threading.Event()
    try:
        with pytest.raises(TimeoutError, match="more than 0 s"):
            on_grammar_stack(lambda: release.wait(60), timeout_s=0.05)
    finally:
        release.set()
    assert threading.stack_size() == before  # put back: other threads keep the default


def test_a_json_schema_in_a_grammar_nested_past_the_parser_says_how_deep_it_nests() -> None:
    # was "guided_grammar: maximum recursion depth exceeded while decoding a JSON object", as if the server had failed
    text = "start: %json " + '{"anyOf": [' * 3_000 + "{}" + "]}" * 3_000
    with pytest.raises(SchemaError, match=r"^guided_grammar\.%json: the schema nests deeper than 64 levels$"):
        check(StructuredOutput(kind="grammar", value=text, field="guided_grammar"))
