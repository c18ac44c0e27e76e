"""OpenAI's `strict` switch (`response_format.json_schema.strict`, a tool's `function.strict`) through a real
instance's HTTP API (tiny model, CPU, in this process; server/strict_field.py). Both were accepted and ignored:

- `strict: true` keeps its schema's objects closed when the request opens objects
  (`structured_outputs.disable_additional_properties: false`): a json_schema output, a named and a required tool
  call. `strict: false`, null or absent leave the request's choice: open. The difference is made visible with a
  logit_bias on the comma token: greedy decoding writes another key wherever the grammar allows one.
- what OpenAI's strict mode also refuses (a property left out of `required`, an `additionalProperties` other than
  false, an object that names no properties) is served as vLLM serves it with strict: the schema says what it
  allows. A `strict` that is not a boolean is a 400 naming it.
- a schema written for OpenAI's strict mode (every key required, nullable fields, `$defs`) is served, closed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from tests.serving.helpers import in_process_instance, tiny_colocated

TIMEOUT = 120.0  # a loaded 2-core machine
A = {"type": "object", "properties": {"a": {"enum": [1]}}, "required": ["a"]}
OPEN = {"structured_outputs": {"disable_additional_properties": False}}
HI = [{"role": "user", "content": "hi"}]
# (strict as sent, None: left out) -> the arguments / output start: closed after "a", or another key after it
STRICT_VALUES = [({"strict": True}, '{"a":1}'), ({"strict": False}, '{"a":1,"'), ({"strict": None}, '{"a":1,"'),
                 ({}, '{"a":1,"')]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(tiny_colocated(256), "strict-field-0") as (address, _):
        yield address


@pytest.fixture(scope="module")
def comma(url: str) -> dict[str, float]:
    tokens = httpx.post(f"{url}/tokenize", json={"model": "tiny", "prompt": ","}, timeout=TIMEOUT).json()["tokens"]
    return {str(tokens[-1]): 100.0}  # the tiny tokenizer puts BOS first


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"model": "tiny", "temperature": 0, **body}, timeout=TIMEOUT)


def _json_schema(schema: dict[str, Any], strict: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "o", "schema": schema, **strict}}


def _tool(parameters: dict[str, Any], strict: dict[str, Any], name: str = "f") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters, **strict}}


@pytest.mark.parametrize(("strict", "start"), STRICT_VALUES)
def test_strict_true_keeps_a_json_schema_closed_when_the_request_opens_objects(
        url: str, comma: dict[str, float], strict: dict[str, Any], start: str) -> None:
    for path, prompt in (("/v1/completions", {"prompt": "hello"}), ("/v1/chat/completions", {"messages": HI})):
        answer = _post(url, path, {**prompt, "max_tokens": 12, "logit_bias": comma, **OPEN,
                                   "response_format": _json_schema(A, strict)})
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        assert text.startswith(start), (path, text)
        if start == '{"a":1}':
            assert text == start and choice["finish_reason"] == "stop", (path, choice)


@pytest.mark.parametrize(("strict", "start"), STRICT_VALUES)
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "f"}}])
def test_strict_true_keeps_a_forced_tool_call_closed_when_the_request_opens_objects(
        url: str, comma: dict[str, float], strict: dict[str, Any], start: str, tool_choice: Any) -> None:
    answer = _post(url, "/v1/chat/completions", {
        "messages": HI, "max_tokens": 64, "logit_bias": comma, **OPEN, "tools": [_tool(A, strict)],
        "tool_choice": tool_choice, "parallel_tool_calls": False})
    assert answer.status_code == 200, answer.text
    calls = answer.json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["f"], calls
    arguments = calls[0]["function"]["arguments"]
    assert arguments.replace(" ", "").startswith(start), arguments
    if start == '{"a":1}':
        assert json.loads(arguments) == {"a": 1}, arguments


def test_a_required_call_closes_only_the_strict_tools_when_the_request_opens_objects() -> None:
    from pdlaunch.server.tool_calls import tool_calling_of

    calling = tool_calling_of([_tool(A, {"strict": True}), _tool(A, {}, "g")], "required")
    assert calling is not None
    spec = calling.structured_output()
    assert spec is not None
    members = json.loads(spec.value)["items"]["anyOf"]
    assert [m["properties"]["parameters"].get("additionalProperties") for m in members] == [False, None]


B = {"type": "object", "properties": {"c": {"enum": [True]}}, "required": ["c"], "additionalProperties": False}
# A schema written for OpenAI's strict mode: every key required, a field that may be empty nullable, $defs.
OPENAI_STRICT = {"type": "object", "properties": {"a": {"enum": [1]}, "b": {"anyOf": [{"$ref": "#/$defs/B"},
                                                                                    {"type": "null"}]}},
                 "required": ["a", "b"], "additionalProperties": False, "$defs": {"B": B}}
OPTIONAL_B = {"type": "object", "properties": {"a": {"enum": [1]}, "b": B}, "required": ["a"]}


DICT = {"type": "object", "properties": {"a": {"enum": [1]}, "m": {"$ref": "#/$defs/M"}}, "required": ["a", "m"],
        "$defs": {"M": {"type": "object", "additionalProperties": {"enum": [2]}, "maxProperties": 1}}}
FREE = {"type": "object", "properties": {"l": {"type": "array", "items": {"type": "object"}, "maxItems": 1}},
        "required": ["l"]}


@pytest.mark.parametrize(("schema", "strict"), [(OPENAI_STRICT, {"strict": True}), (OPTIONAL_B, {"strict": False}),
                                                (OPTIONAL_B, {"strict": True}), (DICT, {"strict": True}),
                                                (FREE, {"strict": True})],
                         ids=["openai-strict", "optional-not-strict", "optional-strict", "dict-strict",
                              "free-object-strict"])
def test_a_schema_that_keeps_the_rules_of_its_strict_value_is_served(url: str, schema: dict[str, Any],
                                                                     strict: dict[str, Any]) -> None:
    """OpenAI would refuse the last three with strict: true; vLLM serves them, and so does this server."""
    answer = _post(url, "/v1/completions", {"prompt": "hello", "max_tokens": 60,
                                            "response_format": _json_schema(schema, strict)})
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["text"]), schema)


ROOT = "response_format.json_schema.schema"
REFUSED = {
    "strict not a boolean": (
        {"response_format": _json_schema(A, {"strict": "true"})}, "response_format.json_schema.strict",
        "must be true or false"),
    "a tool's strict not a boolean": (
        {"tools": [_tool(A, {"strict": 1})], "tool_choice": "required"}, "tools.0.function.strict",
        "must be true or false"),
    "a strict tool's $ref to nothing, tool_choice auto": (
        {"tools": [_tool({**A, "properties": {"a": {"$ref": "#/$defs/nope"}}}, {"strict": True})]},
        "tools.0.function.parameters.properties.a.$ref", "nope"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_strict_that_is_no_boolean_or_a_broken_strict_schema_is_a_400_naming_it(url: str, case: str) -> None:
    body, param, words = REFUSED[case]
    answer = _post(url, "/v1/chat/completions", {"messages": HI, "max_tokens": 4, **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_a_strict_tool_that_openai_would_refuse_is_accepted_under_auto(url: str) -> None:
    answer = _post(url, "/v1/chat/completions", {"messages": HI, "max_tokens": 4,
                                                 "tools": [_tool(OPTIONAL_B, {"strict": True}),
                                                           _tool({"type": "object"}, {"strict": True}, "g")]})
    assert answer.status_code == 200, answer.text
