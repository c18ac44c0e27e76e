"""Strict JSON schemas whose `allOf` / `anyOf` members are `$ref`s to definitions (engine/strict_schema.py,
engine/schema_refs.py), through a real instance's HTTP API (tiny model, CPU, in this process):

- A definition a member refers to is closed as the same member written inline. Closing read only inline members:
  the object beside a `$ref` member was left open while the definition was closed on its own, so it forbade the
  object's other keys and a valid schema was a 400 "Unsatisfiable schema: required property 'a' is unsatisfiable"
  (an `anyOf` of `$ref`s beside the object's `properties`, one nested in an `allOf` member, a `$ref` beside
  `properties`, as pydantic writes a subclass).
- A required tool choice over a tool whose parameters use `$defs` was a 400 "Pointer '/$defs/Loc' does not exist":
  the tool's `#/$defs/...` were read from the root of the array that holds every tool's parameters.
- A `$ref` that points to nothing is a 400 whose param is its own path in the request, whichever field holds the
  schema (it named only the field: "Pointer '/$defs/nope' does not exist").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from pdlaunch.engine.schema_refs import SchemaRefError, root_pointers
from pdlaunch.engine.strict_schema import MAX_CLOSING_STEPS, MAX_INLINED_CHARS, close_objects
from pdlaunch.engine.structured_output import StructuredOutput, check
from tests.serving.helpers import in_process_instance, tiny_colocated

TIMEOUT = 120.0  # a loaded 2-core machine
B = {"properties": {"b": {"enum": [True]}}, "required": ["b"]}
X = {"properties": {"kind": {"const": "x"}, "x": {"enum": [1]}}, "required": ["kind", "x"]}
Y = {"properties": {"kind": {"const": "y"}, "y": {"enum": [2]}}, "required": ["kind", "y"]}
ID = {"id": {"enum": [7]}}


def referred(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "$defs": defs}


# (schema whose members are $refs, the same schema with those members inline, the key sets an output may have)
CASES = {
    "allOf": (referred({"type": "object", "properties": {"a": {"enum": [1]}}, "required": ["a", "b"],
                        "allOf": [{"$ref": "#/$defs/B"}]}, {"B": B}),
              {"type": "object", "properties": {"a": {"enum": [1]}}, "required": ["a", "b"], "allOf": [B]},
              [{"a", "b"}]),
    "anyOf beside properties": (
        referred({"type": "object", "properties": ID, "required": ["id"],
                  "anyOf": [{"$ref": "#/$defs/X"}, {"$ref": "#/$defs/Y"}]}, {"X": X, "Y": Y}),
        {"type": "object", "properties": ID, "required": ["id"], "anyOf": [X, Y]},
        [{"id", "kind", "x"}, {"id", "kind", "y"}]),
    "anyOf in an allOf member": (
        referred({"type": "object", "properties": ID, "required": ["id", "kind"],
                  "allOf": [{"anyOf": [{"$ref": "#/$defs/X"}, {"$ref": "#/$defs/Y"}]}]}, {"X": X, "Y": Y}),
        {"type": "object", "properties": ID, "required": ["id", "kind"], "allOf": [{"anyOf": [X, Y]}]},
        [{"id", "kind", "x"}, {"id", "kind", "y"}]),
    "$ref beside properties": (
        referred({"$ref": "#/$defs/B", "type": "object", "properties": {"a": {"enum": [1]}}, "required": ["a"]},
                 {"B": B}),
        {"type": "object", "properties": {"a": {"enum": [1]}}, "required": ["a"], "allOf": [B]},
        [{"a", "b"}]),
}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(tiny_colocated(256), "strict-refs-0") as (address, _):
        yield address


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"model": "tiny", "temperature": 0, **body}, timeout=TIMEOUT)


@pytest.mark.parametrize("case", CASES)
def test_a_referenced_member_is_closed_as_the_same_member_inline(case: str) -> None:
    with_refs, inline, _ = CASES[case]
    closed, closed_inline = close_objects(root_pointers(with_refs, "schema")), close_objects(inline)
    assert isinstance(closed, dict) and isinstance(closed_inline, dict)
    assert closed["additionalProperties"] is closed_inline["additionalProperties"] is False
    assert closed["properties"] == closed_inline["properties"]
    for key in ("allOf", "anyOf"):
        assert closed.get(key) == closed_inline.get(key), key  # the copies of the definitions, closed in place
    assert closed["$defs"] == {name: close_objects(d) for name, d in with_refs["$defs"].items()}  # each on its own


@pytest.mark.parametrize("case", CASES)
def test_json_schema_members_given_as_refs_are_served(url: str, case: str) -> None:
    schema, _, keys = CASES[case]
    answer = _post(url, "/v1/completions", {"prompt": "hello", "max_tokens": 40, "response_format": {
        "type": "json_schema", "json_schema": {"name": "o", "strict": True, "schema": schema}}})
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice  # closed: the object ends once its keys are written
    out = json.loads(choice["text"])
    jsonschema.validate(out, schema)
    assert set(out) in keys, out


CITY_DEF = {"type": "object", "properties": {"city": {"enum": ["Oslo"]}}, "required": ["city"]}
LOC = {"type": "object", "properties": {"loc": {"$ref": "#/$defs/Loc"}}, "required": ["loc"],
       "$defs": {"Loc": {"type": "object", "allOf": [{"$ref": "#/$defs/City"}], "properties": {"zip": {"enum": [9]}},
                         "required": ["zip"]},
                 "City": CITY_DEF}}


CITY = {"type": "object", "properties": {"loc": {"$ref": "#/$defs/City"}}, "required": ["loc"],
        "$defs": {"City": CITY_DEF}}


@pytest.mark.parametrize(("parameters", "expected"), [(LOC, {"loc": {"city": "Oslo", "zip": 9}}),
                                                      (CITY, {"loc": {"city": "Oslo"}})], ids=["allOf-ref", "ref"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "where"}}],
                         ids=["required", "named"])
def test_tool_parameters_with_defs_are_served(url: str, choice: Any, parameters: dict[str, Any],
                                              expected: dict[str, Any]) -> None:
    """The tool with definitions is the second: a required call's schema holds it at items.anyOf.1 (a logit_bias on
    its name's tokens has the model pick it there)."""
    name = httpx.post(f"{url}/tokenize", json={"model": "tiny", "prompt": "where", "add_special_tokens": False},
                      timeout=TIMEOUT).json()["tokens"]
    other = {"type": "object", "properties": {"n": {"enum": [0]}}, "required": ["n"]}
    tools = [{"type": "function", "function": {"name": "other", "parameters": other}},
             {"type": "function", "function": {"name": "where", "strict": True, "parameters": parameters}}]
    answer = _post(url, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "where?"}], "max_tokens": 60, "tools": tools, "tool_choice": choice,
        "parallel_tool_calls": False, "logit_bias": {str(token): 50 for token in name}})
    assert answer.status_code == 200, answer.text
    calls = answer.json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["where"], calls
    assert json.loads(calls[0]["function"]["arguments"]) == expected, calls


NOWHERE = {"type": "object", "properties": {"a": {"type": "integer"}},
           "allOf": [{"anyOf": [{"$ref": "#/$defs/there"}, {"$ref": "#/$defs/nope"}]}],
           "$defs": {"there": {"properties": {"t": {"type": "integer"}}}}}
WHERE = "allOf.0.anyOf.1.$ref"
BAD_TOOL = {"type": "function", "function": {"name": "g", "parameters": NOWHERE}}
GOOD_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "o", "strict": True, "schema": NOWHERE}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"json": NOWHERE, "disable_additional_properties": False}}, "structured_outputs.json"),
    ({"guided_json": NOWHERE}, "guided_json"),
    ({"tools": [GOOD_TOOL, BAD_TOOL], "tool_choice": "required"}, "tools.1.function.parameters"),
    ({"tools": [BAD_TOOL, GOOD_TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tools.0.function.parameters"),
], ids=["response_format", "structured_outputs-open", "guided_json", "required-tool", "named-tool"])
def test_a_ref_that_points_nowhere_is_a_400_naming_its_path(url: str, body: dict[str, Any], param: str) -> None:
    answer = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                                  **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == f"{param}.{WHERE}", error
    assert "'#/$defs/nope' points to nothing in the schema" in error["message"], error


NOT_A_URI = {"type": "object", "properties": {"a": {"$id": "http://[::1", "type": "integer"},
                                            "b": {"$ref": "http://[::1/s.json"}, "c": {"$ref": "#/allOf/\u00b2"}},
             "allOf": [{}]}


@pytest.mark.parametrize("where", ["a.$id", "b.$ref", "c.$ref"], ids=["id", "ref", "superscript-index"])
@pytest.mark.parametrize("field", ["guided_json", "required-tool", "named-tool"])
def test_an_id_or_ref_urllib_or_int_refuses_is_a_400_naming_it(url: str, field: str, where: str) -> None:
    """urllib refuses "http://[::1" (ValueError: Invalid IPv6 URL), and "²" is a digit to str.isdigit that int()
    refuses: a tool's parameters holding one were a 500, a guided_json a 400 naming only the field."""
    name, _, keyword = where.partition(".")
    schema = {**NOT_A_URI, "properties": {name: NOT_A_URI["properties"][name]}}
    tool = {"type": "function", "function": {"name": "g", "parameters": schema}}
    bodies = {"guided_json": ({"guided_json": schema}, "guided_json"),
              "required-tool": ({"tools": [GOOD_TOOL, tool], "tool_choice": "required"}, "tools.1.function.parameters"),
              "named-tool": ({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}},
                             "tools.0.function.parameters")}
    body, param = bodies[field]
    answer = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                                  **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == f"{param}.properties.{where}", error


@pytest.mark.parametrize(("ref", "why"), [
    ("#/$defs/missing", "points to nothing"), ("#/$defs/there/properties/t/type", "points to a str, not a schema"),
    ("#nameless", "no $anchor 'nameless'"), ("https://example.com/s.json", "other documents are not fetched"),
    (3, "must be a string"),
])
def test_what_a_ref_names_is_in_its_schema(ref: Any, why: str) -> None:
    schema = {**NOWHERE, "allOf": [], "properties": {"a": {"$ref": ref}}}
    with pytest.raises(SchemaRefError) as raised:
        root_pointers(schema, "guided_json")
    assert raised.value.field == "guided_json.properties.a.$ref" and why in raised.value.message, raised.value


def test_refs_become_pointers_from_the_root() -> None:
    """An $anchor, an $id's URI, escaped pointer keys: each $ref is the pointer to what it named, and the $ids and
    anchors below the root go (a copy of a definition may sit anywhere); under a prefix, from where it will sit."""
    schema = {"$id": "https://e.com/root.json", "properties": {
        "a": {"$ref": "#bee"}, "b": {"$ref": "inner.json#/$defs/i"}, "c": {"$ref": "#/$defs/a~1b%20c"},
        "d": {"$ref": "#"}},
        "$defs": {"bee": {"$anchor": "bee"}, "inner": {"$id": "inner.json", "$defs": {"i": {"type": "integer"}}},
                  "a/b c": {"type": "string"}}}
    out = root_pointers(schema, "f")
    assert isinstance(out, dict)
    assert [p["$ref"] for p in out["properties"].values()] == [
        "#/$defs/bee", "#/$defs/inner/$defs/i", "#/$defs/a~1b%20c", "#"]
    assert out["$id"] == schema["$id"] and out["$defs"]["bee"] == {} and "$id" not in out["$defs"]["inner"]
    assert schema["$defs"]["bee"] == {"$anchor": "bee"}  # a copy
    under = root_pointers(schema, "f", ("items", "0"))
    assert isinstance(under, dict) and "$id" not in under and under["properties"]["d"]["$ref"] == "#/items/0"


def test_definitions_in_a_cycle_stay_refs_and_leave_their_object_open() -> None:
    schema = {"type": "object", "properties": {"a": {}}, "allOf": [{"$ref": "#/$defs/L"}],
              "$defs": {"L": {"properties": {"l": {}}, "allOf": [{"$ref": "#/$defs/L"}]}}}
    closed = close_objects(schema)
    assert isinstance(closed, dict) and "additionalProperties" not in closed  # L's keys cannot be listed
    assert closed["allOf"][0]["allOf"] == [{"$ref": "#/$defs/L"}]  # copied once, then left a $ref


def test_definitions_that_double_in_layers_are_refused_past_the_bound() -> None:
    """Each layer's definition refers to the next one twice: 2^30 copies once closed in place (the bound on the steps
    closing takes is met first, or the one on the characters copied)."""
    layers = 30
    defs: dict[str, Any] = {f"L{i}": {"properties": {f"k{i}": {"type": "integer"}},
                                      "allOf": [{"$ref": f"#/$defs/L{i + 1}"}, {"$ref": f"#/$defs/L{i + 1}"}]}
                            for i in range(layers)}
    defs[f"L{layers}"] = {"properties": {"z": {"type": "integer"}}}
    schema = {"type": "object", "properties": {"a": {}}, "allOf": [{"$ref": "#/$defs/L0"}], "$defs": defs}
    with pytest.raises(ValueError, match=f"more than ({MAX_INLINED_CHARS:,} characters|{MAX_CLOSING_STEPS:,} steps)"):
        check(StructuredOutput(kind="json", value=json.dumps(schema), field="guided_json"))
