"""Tool calling input a black-box audit found accepted (real HTTP, the tiny random model on CPU, one colocated
instance): each is now a 400 naming the field as sent, what it got and what to send.

- A tool with `function.name: ""` was taken: no call the model writes can name it (OpenAI requires 1 to 64 of
  letters, digits, `_` and `-`; vLLM takes any name, so only an empty or blank one is refused here).
- An assistant tool call in the history whose `arguments` is a number (or a list, a boolean, or JSON text of one)
  was taken and rendered as that number. OpenAI sends arguments as a JSON string; vLLM also takes an object (its
  templates render `arguments | tojson`), and both still pass; as vLLM reads them, no arguments (null, "", "null",
  false, 0, []) are {} (a template iterating `arguments|items` failed on a null).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.server.chat_template import template_message
from tests.serving.helpers import tiny_instance

TIMEOUT = 120.0  # a loaded 2-core machine
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with tiny_instance("audit8-tools") as instance_url:
        yield instance_url


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    if path.startswith("/v1"):
        body = {**body, "max_tokens": 2}
    return httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)


def assert_400(answer: httpx.Response, param: str, *says: str) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert all(part in error["message"] for part in says), error


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize("name", ["", "  "])
def test_a_tool_without_a_name_is_refused(url: str, path: str, name: str) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": name}}]
    assert_400(_post(url, path, {"messages": HI, "tools": tools}), "tools.1.function.name",
               "tools.1.function.name: is empty", "the name the model calls the tool by")


def _history(arguments: object) -> list[dict[str, Any]]:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return [*HI, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "4"}, {"role": "user", "content": "and?"}]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize(("arguments", "got"), [(5, "an integer"), (1.5, "a number"), ([1], "a list of integers"),
                                                (True, "a boolean"), ("5", "an integer"),
                                                ("[1, 2]", "a list of integers")])
def test_tool_call_arguments_that_are_no_json_text_are_refused(url: str, path: str, arguments: object,
                                                               got: str) -> None:
    assert_400(_post(url, path, {"messages": _history(arguments)}), "messages.1.tool_calls.0.function.arguments",
               f"must be a JSON string of the arguments (got {got})", '"{\\"city\\": \\"Oslo\\"}"')


@pytest.mark.parametrize("arguments", ['{"city": "Oslo"}', {"city": "Oslo"}, ""])
def test_arguments_as_json_text_or_an_object_still_pass(url: str, arguments: object) -> None:
    answer = _post(url, "/v1/chat/completions", {"messages": _history(arguments)})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("arguments", [None, "null", "", False, 0, []])
def test_no_arguments_render_as_an_empty_object_as_vllm_reads_them(url: str, arguments: object) -> None:
    # What the template is given (the tiny model's template renders no tool calls, so its tokens cannot show it),
    # then the route's answer.
    call = _history(arguments)[1]["tool_calls"][0]
    given = template_message("assistant", None, {"tool_calls": [call]}, 1)["tool_calls"]
    assert given[0]["function"]["arguments"] == {}
    tokens = _post(url, "/tokenize", {"messages": _history(arguments)})
    assert tokens.status_code == 200, tokens.text
