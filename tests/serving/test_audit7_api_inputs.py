"""Client input whose 400 named a field the client never wrote or a Python class (real HTTP, the tiny random model
on CPU, one colocated instance for every probe): each is now a 400 naming the field as sent, what it got and what
to send.

- A tool that is not an object (`"tools": [1]`) read `tools.0.body: Input should be a valid dictionary or instance
  of Tool`: `body` is no field of the request, and `Tool` is pdlaunch's class.
- A message that is not an object read `messages.0: Input should be a valid dictionary or instance of ChatMessage`.
- A misspelt field of /tokenize or /detokenize read `promt: Extra inputs are not permitted`, and a /tokenize body
  with both `prompt` and `messages` read `prompt: Extra inputs are not permitted`, as if prompt were no field.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.serving.helpers import tiny_instance

TIMEOUT = 120.0  # a loaded 2-core machine
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with tiny_instance("audit7-inputs") as instance_url:
        yield instance_url


def assert_400(answer: httpx.Response, param: str, *says: str) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert all(part in error["message"] for part in says), error
    assert "instance of" not in error["message"] and ".body" not in error["message"], error


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize(("tool", "got"), [(1, "an integer"), (None, "null"), ("f", "a string"), ([], "an empty list")])
def test_a_tool_that_is_no_object_is_named_as_sent(url: str, path: str, tool: object, got: str) -> None:
    body: dict[str, Any] = {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}, tool]}
    if path.startswith("/v1"):
        body["max_tokens"] = 2
    assert_400(httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT), "tools.1",
               f"tools.1: must be an object (got {got})", '{"type": "function", "function": {"name": ')


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize(("message", "got"), [(1, "an integer"), (None, "null"), ("hi", "a string")])
def test_a_message_that_is_no_object_is_named_as_sent(url: str, path: str, message: object, got: str) -> None:
    body: dict[str, Any] = {"messages": [*HI, message]}
    if path.startswith("/v1"):
        body["max_tokens"] = 2
    assert_400(httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT), "messages.1",
               f"messages.1: must be an object (got {got})", '{"role": "user", "content": ')


@pytest.mark.parametrize(("path", "body", "param", "says"), [
    ("/tokenize", {"promt": "hi"}, "promt", ["promt: is not a field of /tokenize", "prompt", "remove it"]),
    ("/tokenize", {"messages": HI, "add_generaton_prompt": True}, "add_generaton_prompt",
     ["add_generaton_prompt: is not a field of /tokenize", "add_generation_prompt"]),
    ("/detokenize", {"tokens": [1], "token": [2]}, "token", ["token: is not a field of /detokenize", "tokens"]),
], ids=["tokenize-prompt", "tokenize-chat", "detokenize"])
def test_a_misspelt_field_says_which_fields_the_route_takes(url: str, path: str, body: dict[str, Any], param: str,
                                                          says: list[str]) -> None:
    assert_400(httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT), param, *says)


def test_tokenize_takes_a_null_chat_template_as_not_sent(url: str) -> None:
    # vLLM's client sends its TokenizeChatRequest's chat_template: null; it read "is not a field of /tokenize".
    answer = httpx.post(f"{url}/tokenize", json={"messages": HI, "chat_template": None}, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    assert answer.json()["tokens"] == httpx.post(f"{url}/tokenize", json={"messages": HI}, timeout=TIMEOUT).json()[
        "tokens"]


def test_tokenize_with_prompt_and_messages_says_to_send_one(url: str) -> None:
    answer = httpx.post(f"{url}/tokenize", json={"prompt": "hi", "messages": HI}, timeout=TIMEOUT)
    assert_400(answer, "prompt", "sends both prompt (a text) and messages (a chat)", "send one of them")


@pytest.mark.parametrize(("field", "value", "says"), [
    ("store", True, "store is not supported by this server (got true); leave it out or send false"),
    ("functions", [{"name": "f"}], 'functions is not supported by this server (got [{"name": "f"}]); leave it out '
                                   "or send []"),
    ("reasoning_effort", "high", 'reasoning_effort is not supported by this server (got "high"); leave it out'),
])
def test_an_unsupported_field_is_quoted_as_json(url: str, field: str, value: object, says: str) -> None:
    """The value was quoted as Python writes it (`got True`, `[{'name': 'f'}]`), not as the client sent it, and the
    values that ask for nothing (and pass) were not named."""
    body = {"messages": HI, "max_tokens": 2, field: value}
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["message"] == says, answer.text


@pytest.mark.parametrize("tool_choice", [5, "sometimes", ["auto"], True])
def test_a_tool_choice_of_no_known_shape_is_named_so_without_tools(url: str, tool_choice: object) -> None:
    """Without tools, such a tool_choice read `tool_choice needs tools`, as if it were a valid choice."""
    body = {"messages": HI, "max_tokens": 2, "tool_choice": tool_choice}
    assert_400(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT), "tool_choice",
               "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")
