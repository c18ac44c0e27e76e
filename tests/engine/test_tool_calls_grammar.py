"""Strict auto tool calls' grammar (engine/tool_calls_grammar.py): the call object's framing is written in Lark around
one `%json` per strict tool's arguments. The calls were one JSON schema holding every tool twice (one copy a key
order), so the schema size bound (engine/grammar_size.py) refused a strict tool past half the schema a request may
send, and llguidance compiled each schema twice.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pdlaunch.engine.grammar_limits import byte_matcher
from pdlaunch.engine.grammar_size import MAX_OBJECT_PROPERTIES, MAX_SCHEMA_PROPERTIES
from pdlaunch.engine.structured_output import check
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.chat_request import ChatCompletionRequest

NESTED = {"type": "object", "properties": {
    "city": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "at": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
           "required": ["lat", "lon"]},
    "unit": {"enum": ["C", "F", None]}}, "required": ["city", "tags", "at", "unit"]}
# non-ASCII text as it is: llguidance's JSON strings take `\u` escapes of control characters only (json.dumps'
# default ensure_ascii writes "\u00fc"), in any schema, as before
ARGUMENTS = {"city": "Zürich \"old\"\n", "tags": ["a", "b"], "at": {"lat": 47.37, "lon": -8.5e-3}, "unit": None}


def _request(tools: list[dict[str, Any]], **body: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 "tools": tools, **body})


def _tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters, "strict": True}}


def _accepts(request: ChatCompletionRequest, text: str) -> bool:
    spec = request.structured_output()
    assert spec is not None and spec.kind == "tool_calls"
    matcher = byte_matcher(check(spec))
    return all(matcher.consume_token(b) for b in text.encode()) and bool(matcher.is_accepting())


def _wide(objects: int) -> dict[str, Any]:
    """A schema of `objects` objects of MAX_OBJECT_PROPERTIES required keys each (llguidance compiles required keys
    in a row quickly)."""
    keys = [f"k{i}" for i in range(MAX_OBJECT_PROPERTIES)]
    inner = {"type": "object", "properties": {k: {"type": "integer"} for k in keys}, "required": keys}
    return {"type": "object", "properties": {f"o{j}": inner for j in range(objects)},
            "required": [f"o{j}" for j in range(objects)]}


@pytest.mark.parametrize("name_first", [True, False])
def test_a_call_as_json_dumps_writes_it_is_accepted_in_either_key_order(name_first: bool) -> None:
    call = {"name": "get_weather", "arguments": ARGUMENTS}
    if not name_first:
        call = {"arguments": ARGUMENTS, "name": "get_weather"}
    request = _request([_tool("get_weather", NESTED), _tool("other", {"type": "object"})])
    assert _accepts(request, f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>")
    assert not _accepts(request, f"<tool_call>\n{json.dumps({**call, 'extra': 1}, ensure_ascii=False)}\n</tool_call>")


@pytest.mark.parametrize("dumps", [{"indent": 2}, {"separators": (",", ":")}, {}])
def test_any_whitespace_takes_every_layout_json_dumps_writes(dumps: dict[str, Any]) -> None:
    request = _request([_tool("get_weather", NESTED)], structured_outputs={"disable_any_whitespace": False})
    call = json.dumps({"name": "get_weather", "arguments": ARGUMENTS}, ensure_ascii=False, **dumps)
    assert _accepts(request, f"<tool_call>{call}</tool_call>")
    broken = call.replace("47.37", '"x"', 1)  # a string where the schema wants a number
    assert not _accepts(request, f"<tool_call>{broken}</tool_call>")


def test_a_tool_name_that_needs_escaping_is_written_as_json_dumps_writes_it() -> None:
    name = 'say "hi" in Zürich'
    request = _request([_tool(name, {"type": "object", "properties": {}})])
    assert _accepts(request, f"<tool_call>{json.dumps({'name': name, 'arguments': {}}, ensure_ascii=False)}"
                             "</tool_call>")


def test_a_strict_tool_past_half_the_schema_bound_is_accepted() -> None:
    """6,006 properties: within MAX_SCHEMA_PROPERTIES once, past it when each call order held its own copy."""
    objects = MAX_SCHEMA_PROPERTIES // MAX_OBJECT_PROPERTIES // 2 + 1
    request = _request([_tool("wide", _wide(objects))])
    assert request.structured_output() is not None


def test_the_strict_tools_together_are_bounded_as_one_schema() -> None:
    """Each schema within its bounds, all of them together past them: a 400 naming the tools."""
    half = _wide(MAX_SCHEMA_PROPERTIES // MAX_OBJECT_PROPERTIES // 2 + 1)
    with pytest.raises(OpenAIError) as caught:
        _request([_tool("a", half), _tool("b", half)]).structured_output()
    assert caught.value.status == 400 and caught.value.param == "tools", caught.value.message
    assert f"{MAX_SCHEMA_PROPERTIES:,} properties" in caught.value.message


@pytest.mark.parametrize("strict", ["all", "one"])
def test_a_call_too_many_tools_for_llguidance_is_a_400_before_anything_runs(strict: str) -> None:
    """700 tools: the row of llguidance's parser after `<tool_call>` holds an item per tool's call (2,103 of at most
    2,000). The probe walked free text only (the lowest byte never opens a call), so the request ran and failed at the
    model's first call, the point of strict tools; now the call's first bytes are probed too."""
    parameters = {"type": "object", "properties": {"a": {"type": "integer"}}}
    tools = [{"type": "function", "function": {"name": f"t{i}", "parameters": parameters,
                                               "strict": strict == "all" or i == 0}} for i in range(700)]
    with pytest.raises(OpenAIError) as caught:
        _request(tools).structured_output()
    assert caught.value.status == 400 and caught.value.param == "tools", caught.value.message
    assert "too large" in caught.value.message and "max is 2000" in caught.value.message, caught.value.message


def test_as_many_tools_as_llguidance_follows_are_accepted() -> None:
    """600 tools, one strict: within the parser's row limit, a call of the last one is followed to its end."""
    tools = [_tool(f"t{i}", {"type": "object", "properties": {"a": {"type": "integer"}}}) for i in range(600)]
    request = _request(tools)
    assert _accepts(request, '<tool_call>\n{"name": "t599", "arguments": {"a": 1}}\n</tool_call>')
    assert _accepts(request, '<tool_call>{"arguments": {"a": 1}, "name": "t0"}</tool_call>')
