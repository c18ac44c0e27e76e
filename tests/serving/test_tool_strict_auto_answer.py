"""response_format / structured_outputs beside a `function.strict: true` tool under tool_choice auto (server/
tool_calls.py, engine/tool_calls_grammar.py). The asked grammar alone constrained the output, so a strict tool's call
was not guaranteed to match its schema (and no call could be written at all). Now one grammar holds both: the output
is the asked JSON answer (content) or Hermes calls (no free text then), each held to its schema; an asked regex,
choice or grammar cannot be joined to calls: a 400 naming both fields.

Through the chat request's path (what the HTTP API compiles) over single bytes, and through a real instance's HTTP
API with the tiny checkpoint whose tokenizer holds `<tool_call>` as one token (test_tool_strict_auto.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from pdlaunch.engine.grammar_limits import byte_matcher
from pdlaunch.engine.structured_output import check
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.chat_request import ChatCompletionRequest
from tests.serving.test_tool_strict_auto import (
    CITY,
    HI,
    TIMEOUT,
    A,
    marker_checkpoint,
    marker_instance,
    served_marker_bias,
)

ANSWER = {"type": "object", "properties": {"name": {"enum": ["Bob"]},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["name", "age"]}  # an answer whose "name" a Llama 3 JSON call's parser would read as a call
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": ANSWER}}


def _tool(name: str, parameters: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters, "strict": strict}}


def _request(**body: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": HI, "tools": [_tool("get_weather", CITY)],
                                                 **body})


def _accepts(request: ChatCompletionRequest, text: str) -> bool:
    """Whether the request's grammar, over single bytes, lets a model write `text` and stop there."""
    spec = request.structured_output()
    assert spec is not None
    matcher = byte_matcher(check(spec))
    return all(matcher.consume_token(b) for b in text.encode()) and bool(matcher.is_accepting())


def _call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


OSLO = _call("get_weather", '{"city": "Oslo", "days": 3}')
ACCEPTED = {
    "the JSON answer": '{"name":"Bob","age":3}',
    "a call": OSLO,
    "a call, the arguments first": '<tool_call>{"arguments": {"city": "Oslo", "days": 3}, "name": "get_weather"}'
                                   "</tool_call>",
    "two calls and the newline after them": OSLO + "\n" + _call("get_weather", '{"city": "Rome", "days": 1}') + "\n",
}
REFUSED = {
    "an answer out of response_format's schema": '{"name":"Bob","age":10}',
    "an answer with a key the schema does not name": '{"name":"Bob","age":3,"x":1}',
    "an answer with spaces (compact, as the asked grammar alone)": '{"name": "Bob", "age": 3}',
    "a call out of the strict schema": _call("get_weather", '{"city": "Oslo", "days": 9}'),
    "a call with a key the strict schema does not name": _call("get_weather", '{"city": "Oslo", "days": 3, "u": 1}'),
    "text before a call (the content is the JSON answer)": "Let me look. " + OSLO,
    "text": "It is sunny",
    "the answer and a call": '{"name":"Bob","age":3}' + OSLO,
}


@pytest.mark.parametrize("case", ACCEPTED)
@pytest.mark.parametrize("asked", ["response_format", "structured_outputs", "guided_json"])
def test_the_joined_grammar_accepts_the_answer_or_calls(case: str, asked: str) -> None:
    field = {"response_format": RESPONSE_FORMAT, "structured_outputs": {"json": ANSWER}, "guided_json": ANSWER}
    assert _accepts(_request(**{asked: field[asked]}), ACCEPTED[case])


@pytest.mark.parametrize("case", REFUSED)
def test_the_joined_grammar_refuses_what_breaks_either_schema(case: str) -> None:
    assert not _accepts(_request(response_format=RESPONSE_FORMAT), REFUSED[case])


def test_the_answer_is_compiled_as_the_asked_grammar_alone() -> None:
    """json_object: any object; disable_any_whitespace: false frees the answer's whitespace and the calls'."""
    assert _accepts(_request(response_format={"type": "json_object"}), '{"x":[1]}')
    assert not _accepts(_request(response_format={"type": "json_object"}), "[1]")
    spaced = _request(response_format=RESPONSE_FORMAT, structured_outputs={"disable_any_whitespace": False})
    assert _accepts(spaced, '{ "name" : "Bob", "age": 3 }')
    assert _accepts(spaced, '<tool_call>{ "name":"get_weather" , "arguments":{"city":"Oslo","days":3} }</tool_call>')
    opened = _request(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": ANSWER}},
                      structured_outputs={"disable_additional_properties": False})
    assert _accepts(opened, '{"name":"Bob","age":3,"x":1}')  # the answer opened as asked, the strict tool not
    assert not _accepts(opened, _call("get_weather", '{"city": "Oslo", "days": 3, "u": 1}'))


def test_parallel_tool_calls_false_allows_one_call_beside_the_answer() -> None:
    request = _request(response_format=RESPONSE_FORMAT, parallel_tool_calls=False)
    assert _accepts(request, OSLO)
    assert not _accepts(request, OSLO + OSLO)


@pytest.mark.parametrize(("body", "field"), [
    ({"structured_outputs": {"regex": "[a-z]+"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": 'start: "a"'}}, "structured_outputs.grammar"),
    ({"guided_regex": "[a-z]+"}, "guided_regex"),
    ({"guided_choice": ["a"]}, "guided_choice"),
])
def test_a_constraint_that_is_not_json_beside_a_strict_tool_is_a_400_naming_both(body: dict[str, Any],
                                                                                   field: str) -> None:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": HI, **body,
                                                    "tools": [_tool("note", A, strict=False), _tool("f", A)]})
    with pytest.raises(OpenAIError) as caught:
        request.structured_output()
    assert caught.value.status == 400 and caught.value.param == field
    assert field in caught.value.message and "tools.1.function.strict" in caught.value.message


# ---- through the HTTP API ----

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return marker_checkpoint(tmp_path_factory.mktemp("tool-markers"))


@pytest.fixture(scope="module")
def url(checkpoint: Path) -> Iterator[str]:
    with marker_instance(checkpoint, "strict-auto-answer-0") as address:
        yield address


@pytest.fixture(scope="module", name="marker_bias")
def _marker_bias(url: str, checkpoint: Path) -> dict[str, float]:
    return served_marker_bias(url, checkpoint)


def _post(url: str, model: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT, json={
        "model": model, "messages": HI, "temperature": 0, "max_tokens": 48, **body})


def _streamed(url: str, model: str, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]], str | None]:
    """(content, tool calls, finish_reason) of a streamed chat answer."""
    content, calls, finish = "", [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=TIMEOUT, json={
            "model": model, "messages": HI, "temperature": 0, "max_tokens": 48, "stream": True, **body}) as answer:
        assert answer.status_code == 200, answer.read()
        for line in answer.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    content += choice["delta"].get("content") or ""
                    calls += choice["delta"].get("tool_calls") or []
                    finish = choice["finish_reason"] or finish
    return content, calls, finish


def test_a_strict_call_beside_response_format_matches_its_schema(url: str, checkpoint: Path,
                                                                 marker_bias: dict[str, float]) -> None:
    """Biased to `<tool_call>`, the model opens a call, which the joined grammar holds to the strict schema (the
    asked grammar alone forbade the marker: it wrote the JSON answer whatever the bias)."""
    body = {"tools": [_tool("f", A)], "parallel_tool_calls": False, "logit_bias": marker_bias,
            "response_format": RESPONSE_FORMAT}
    answer = _post(url, checkpoint.name, body)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and not choice["message"]["content"], choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "f"
    jsonschema.validate(json.loads(call["function"]["arguments"]), {**A, "additionalProperties": False})
    content, calls, finish = _streamed(url, checkpoint.name, body)
    assert (content, finish) == ("", "tool_calls")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("f", call["function"]["arguments"])]


@pytest.mark.parametrize("strict", [True, False])
def test_a_json_answer_beside_auto_tools_is_content_not_a_call(url: str, checkpoint: Path, strict: bool) -> None:
    """The answer `{"name": "Bob", ...}` is response_format's JSON: content, whole and streamed (it was read as a
    Llama 3 JSON call of a tool named "Bob"). Biased to "{", the model writes the answer rather than a call."""
    [brace] = httpx.post(f"{url}/tokenize", timeout=TIMEOUT, json={
        "model": checkpoint.name, "prompt": "{", "add_special_tokens": False}).json()["tokens"]
    body = {"tools": [_tool("f", A, strict)], "response_format": RESPONSE_FORMAT, "logit_bias": {str(brace): 100.0}}
    answer = _post(url, checkpoint.name, body)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert not choice["message"]["tool_calls"] and choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), {**ANSWER, "additionalProperties": False})
    assert _streamed(url, checkpoint.name, body) == (choice["message"]["content"], [], "stop")


BROKEN = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}  # a pattern that does not compile


@pytest.mark.parametrize(("schema", "parameters", "param"), [
    ({"type": "string", "pattern": "(("}, A, "response_format.json_schema.schema"),
    (ANSWER, BROKEN, "tools.1.function.parameters"),
    ({"$ref": "#/$defs/none"}, A, "response_format.json_schema.schema.$ref"),
])
def test_a_schema_that_does_not_compile_beside_strict_auto_is_named_where_it_was_written(
        url: str, checkpoint: Path, schema: dict[str, Any], parameters: dict[str, Any], param: str) -> None:
    answer = _post(url, checkpoint.name, {
        "tools": [_tool("f", A), _tool("g", parameters)], "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param, answer.text


def test_a_regex_beside_a_strict_tool_is_a_400_naming_both(url: str, checkpoint: Path) -> None:
    answer = _post(url, checkpoint.name, {"tools": [_tool("f", A)], "structured_outputs": {"regex": "[a-z]+"}})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "structured_outputs.regex", error
    assert "tools.0.function.strict" in error["message"] and "Traceback" not in answer.text, error
