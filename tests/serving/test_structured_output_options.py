"""Structured-output options through a real instance's HTTP API (tiny model, CPU, in this process):

- `structured_outputs.disable_any_whitespace: false` allows whitespace between JSON tokens whichever field asked
  for the JSON (as vLLM folds response_format into structured_outputs): it applied only to a constraint inside
  structured_outputs, and with response_format, guided_json or a forced tool call it was accepted and ignored.
- A strict (closed) object schema that names more of its keys in an allOf / anyOf beside its `properties` (a
  discriminated union) is served with exactly those keys: closing the object forbade the members' keys, and the
  valid schema was a 400 "Unsatisfiable schema".
- A required tool choice over a tool whose parameters schema does not compile names that tool's parameters
  (`tools.1.function.parameters`), as a named tool choice does, not the whole `tools` list.

The whitespace is made visible with a logit_bias on the space token: greedy decoding takes it wherever the grammar
allows it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.engine.strict_schema import close_objects
from pdlaunch.http.sse import parse_sse
from tests.serving.helpers import in_process_instance, tiny_colocated

TIMEOUT = 120.0  # a loaded 2-core machine
WHITESPACE = {"disable_any_whitespace": False}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(tiny_colocated(256), "structured-options-0") as (address, _):
        yield address


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"model": "tiny", "temperature": 0, **body}, timeout=TIMEOUT)


def _space_bias(url: str) -> dict[str, float]:
    tokens = httpx.post(f"{url}/tokenize", json={"model": "tiny", "prompt": " "}, timeout=TIMEOUT).json()["tokens"]
    return {str(tokens[-1]): 100.0}  # the tiny tokenizer puts BOS first


def _text(url: str, body: dict[str, Any]) -> str:
    answer = _post(url, "/v1/completions", {"prompt": "hello", "max_tokens": 4, **body})
    assert answer.status_code == 200, answer.text
    text: str = answer.json()["choices"][0]["text"]
    return text


@pytest.mark.parametrize("asked", [
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}}},
    {"guided_json": {"type": "object"}},
])
def test_disable_any_whitespace_false_applies_to_the_field_that_asked_for_json(url: str,
                                                                               asked: dict[str, Any]) -> None:
    bias = _space_bias(url)
    assert _text(url, {**asked, "logit_bias": bias}).startswith('{"')  # compact: no space after the brace
    assert _text(url, {**asked, "logit_bias": bias, "structured_outputs": WHITESPACE}).startswith("{ ")


def test_disable_any_whitespace_false_applies_to_a_forced_tool_call(url: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "f"}}, "logit_bias": _space_bias(url)}
    for options, start in (({}, '{"'), ({"structured_outputs": WHITESPACE}, "{ ")):
        answer = _post(url, "/v1/chat/completions", {**body, **options})
        assert answer.status_code == 200, answer.text
        calls = answer.json()["choices"][0]["message"]["tool_calls"]
        assert calls[0]["function"]["arguments"].startswith(start), calls


ALL_OF = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"],
          "allOf": [{"properties": {"b": {"enum": [True]}}, "required": ["b"]}]}
ANY_OF = {"type": "object", "properties": {"kind": {"enum": ["x", "y"]}}, "required": ["kind"],
          "anyOf": [{"properties": {"kind": {"const": "x"}, "x": {"enum": [1]}}, "required": ["x"]},
                    {"properties": {"kind": {"const": "y"}, "y": {"enum": [2]}}, "required": ["y"]}]}


def test_a_union_beside_properties_closes_each_member_to_its_keys_and_the_objects() -> None:
    closed = close_objects(ANY_OF)
    assert closed["additionalProperties"] is False and list(closed["properties"]) == ["kind", "x", "y"]
    assert [list(m["properties"]) for m in closed["anyOf"]] == [["kind", "x"], ["kind", "y"]]
    assert all(m["additionalProperties"] is False for m in closed["anyOf"])
    whole = close_objects({"anyOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}]})
    assert [list(m["properties"]) for m in whole["anyOf"]] == [["x"], ["y"]]  # whole alternatives, as before
    referred = close_objects({**ALL_OF, "allOf": [{"$ref": "#/$defs/b"}], "$defs": {"b": {"type": "object"}}})
    assert referred["additionalProperties"] is False  # its definition names no key, as the same member inline
    unknown = close_objects({**ALL_OF, "allOf": [{"$ref": "other.json"}]})
    assert "additionalProperties" not in unknown  # the keys of another document are not listed: left open, still valid


@pytest.mark.parametrize(("schema", "keys"), [(ALL_OF, [{"a", "b"}]), (ANY_OF, [{"kind", "x"}, {"kind", "y"}])])
@pytest.mark.parametrize("stream", [False, True])
def test_a_closed_object_keeps_the_keys_its_composition_names(url: str, schema: dict[str, Any],
                                                             keys: list[set[str]], stream: bool) -> None:
    body = {"prompt": "hello", "max_tokens": 40, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}}
    answer = _post(url, "/v1/completions", body)
    assert answer.status_code == 200, answer.text
    if stream:
        chunks = [json.loads(e)["choices"] for e in parse_sse(answer.content)[:-1]]
        text = "".join(c[0]["text"] for c in chunks if c)
        finish = [c[0]["finish_reason"] for c in chunks if c][-1]
    else:
        choice = answer.json()["choices"][0]
        text, finish = choice["text"], choice["finish_reason"]
    assert finish == "stop", text  # closed: the object ends once its keys are written
    assert set(json.loads(text)) in keys, text


def test_a_required_tool_choice_names_the_tool_whose_schema_does_not_compile(url: str) -> None:
    bad = {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {
        "a": {"type": "bogus"}}}}}
    answer = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                                  "tools": [TOOL, bad], "tool_choice": "required"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "tools.1.function.parameters" and "bogus" in error["message"], error


# A union inside an allOf member, and one nested in the member of an object left open explicitly, or beside a $ref
# member (closed as that member inline): (schema, an instance it accepts, the object's additionalProperties once
# closed). Closing each inner member alone forbade the keys its object names: the first was a 400 "Unsatisfiable
# schema" (x is required), the others refused a valid instance.
NESTED_UNIONS = [
    ({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x", "a"],
      "allOf": [{"anyOf": [{"properties": {"a": {"type": "integer"}}}, {"properties": {"b": {"type": "integer"}}}]}]},
     {"x": 1, "a": 2}, False),
    ({"type": "object", "properties": {"kind": {"type": "string"}}, "additionalProperties": True,
      "anyOf": [{"anyOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}]}]},
     {"kind": "k", "a": 1, "z": 2}, True),
    ({"type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"],
      "anyOf": [{"$ref": "#/$defs/r"}, {"anyOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}]}],
      "$defs": {"r": {"required": ["r"]}}},
     {"kind": "k", "a": 1}, False),
]


@pytest.mark.parametrize(("schema", "instance", "closed_to"), NESTED_UNIONS)
def test_a_union_nested_in_a_composition_keeps_its_objects_keys(schema: dict[str, Any], instance: dict[str, Any],
                                                                closed_to: bool | None) -> None:
    import jsonschema

    from pdlaunch.engine.structured_output import StructuredOutput, check

    jsonschema.validate(instance, schema)
    closed = close_objects(schema)
    jsonschema.validate(instance, closed)  # closing keeps every key the schema lets the object have
    assert closed.get("additionalProperties") is closed_to
    check(StructuredOutput(kind="json", value=json.dumps(schema)))  # closed, it compiles: satisfiable


def test_a_union_in_an_allof_alone_still_closes_its_members() -> None:
    """Nothing beside it names keys: its members are whole alternatives, each closed to its own keys (as before);
    beside another allOf member's keys, each closes to its own and those."""
    union = {"anyOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    members = close_objects({"allOf": [union]})["allOf"][0]["anyOf"]
    assert all(m["additionalProperties"] is False for m in members)
    assert [set(m["properties"]) for m in members] == [{"a"}, {"b"}]
    members = close_objects({"allOf": [union, {"properties": {"c": {}}}]})["allOf"][0]["anyOf"]
    assert [set(m["properties"]) for m in members] == [{"a", "c"}, {"b", "c"}]


def test_a_named_tool_choice_names_its_own_tool_when_another_schema_is_bad_too() -> None:
    """Only the named tool's parameters constrain the output: another tool's bad schema is not what failed (it was
    named, as the first bad one of every tool, once a required choice's tools were checked one by one)."""
    from pdlaunch.http.errors import OpenAIError
    from pdlaunch.server.chat_request import ChatCompletionRequest

    def bad(name: str) -> dict[str, Any]:
        return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {
            "a": {"type": f"bogus_{name}"}}}}}

    request = ChatCompletionRequest.model_validate({
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [bad("f"), bad("g")],
        "tool_choice": {"type": "function", "function": {"name": "g"}}})
    with pytest.raises(OpenAIError) as raised:
        request.structured_output()
    assert raised.value.param == "tools.1.function.parameters" and "bogus_g" in str(raised.value), raised.value
