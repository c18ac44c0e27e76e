"""OpenAI request bodies at the edges, sent to a real colocated instance of the tiny model: each is answered
as OpenAI documents, a 400 in OpenAI's error shape naming the field, or a 200 of OpenAI's shape, never a
200 that silently dropped or reinterpreted what the client sent.

- Types are strict: `true` is not the token id / count 1 and "0.5" is not a number.
- A union field of the wrong shape (prompt, stop) names the field, not pydantic's `prompt.str`.
- A non-empty stream_options without stream, and chat's top_logprobs without logprobs, are refused (as vLLM)
  instead of ignored; an empty `stream_options: {}`, which asks for nothing, passes as vLLM lets it.
- Chat errors name the field the client sent (top_logprobs, max_completion_tokens), not the engine's.
- A text content part needs a string `text`; a tool message needs its tool_call_id; a message's name is a
  string (the chat template dropped anything else).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.serving.e2e import Serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TIMEOUT = 120.0  # a 2-core machine shared with other tests
HI = [{"role": "user", "content": "hi"}]
CALL = {"role": "assistant", "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


@pytest.fixture(scope="module")
def url(pd_and_colocated_deployments: dict[str, Serve]) -> str:
    """The colocated instance of a `pdlaunch serve --colocated`: the one tests/serving/conftest.py shares with the
    modules that compare it with PD (every request here sends max_tokens or is refused: no answer runs long)."""
    return pd_and_colocated_deployments["colocated"].instance_urls()["colocated-0"]


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=json.dumps(body), headers={"Content-Type": "application/json"},
                      timeout=TIMEOUT)


def assert_refused(response: httpx.Response, param: str) -> None:
    """A 400 in OpenAI's error shape whose param is `param` and whose message names it."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert param.rsplit(".", 1)[-1] in error["message"], error


def assert_completion(response: httpx.Response, chat: bool, choices: int = 1) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == ("chat.completion" if chat else "text_completion")
    assert [c["index"] for c in body["choices"]] == list(range(choices))
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": [True, False]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": True}, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": HI, "seed": "7"}, "seed"),
    ("/v1/chat/completions", {"messages": HI, "max_completion_tokens": True}, "max_completion_tokens"),
    ("/detokenize", {"tokens": [True]}, "tokens.0"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": "no"}, "add_special_tokens"),
], ids=["prompt-bools", "max_tokens-bool", "max_tokens-string", "n-bool", "completion-logprobs-bool",
        "temperature-string", "stream-string", "seed-string", "max_completion_tokens-bool", "detokenize-bool",
        "add_special_tokens-string"])
def test_booleans_and_strings_are_not_numbers(url: str, path: str, body: dict[str, Any], param: str) -> None:
    if path.startswith("/v1/"):
        body = {"max_tokens": 2, **body}
    assert_refused(post(url, path, body), param)


def test_logit_bias_keys_are_token_ids_and_its_values_numbers(url: str) -> None:
    """JSON object keys are strings: logit_bias's are read as token ids under strict types; its values are
    numbers, not booleans."""
    assert_refused(post(url, "/v1/completions", {"prompt": "hi", "logit_bias": {"5": True}}), "logit_bias.5")
    response = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "logit_bias": {"5": 100},
                                             "return_token_ids": True})
    assert_completion(response, chat=False)
    assert response.json()["choices"][0]["token_ids"] == [5, 5, 5]
    assert_refused(post(url, "/v1/completions", {"prompt": "hi", "logit_bias": {"five": 1}}), "logit_bias")


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": [1, "a"]}, "prompt"), ({"prompt": [[[1]]]}, "prompt"), ({"prompt": None}, "prompt"),
    ({"prompt": "hi", "stop": 5}, "stop"), ({"prompt": "hi", "stop": [None]}, "stop"),
])
def test_a_union_field_of_the_wrong_shape_is_named(url: str, body: dict[str, Any], param: str) -> None:
    response = post(url, "/v1/completions", {"max_tokens": 2, **body})
    assert_refused(response, param)
    assert "must be a string" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_options_without_stream_is_refused(url: str, path: str) -> None:
    body: dict[str, Any] = {"prompt": "hi"} if path == "/v1/completions" else {"messages": HI}
    body["max_tokens"] = 2
    assert_refused(post(url, path, {**body, "stream_options": {"include_usage": True}}), "stream_options")
    assert_refused(post(url, path, {**body, "stream": False, "stream_options": {"include_usage": False}}),
                   "stream_options")
    for options in ({}, None):
        assert_completion(post(url, path, {**body, "stream": False, "stream_options": options}),
                          chat=path.endswith("chat/completions"))


def test_top_logprobs_needs_logprobs(url: str) -> None:
    assert_refused(post(url, "/v1/chat/completions", {"messages": HI, "max_tokens": 2, "top_logprobs": 3}),
                   "top_logprobs")
    assert_completion(post(url, "/v1/chat/completions", {"messages": HI, "max_tokens": 2, "top_logprobs": 0}),
                      chat=True)
    response = post(url, "/v1/chat/completions", {"messages": HI, "max_tokens": 2, "logprobs": True,
                                                  "top_logprobs": 3})
    assert_completion(response, chat=True)
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and all(len(entry["top_logprobs"]) == 3 for entry in content)


@pytest.mark.parametrize(("body", "param"), [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": 2**40}, "max_completion_tokens"),
])
def test_chat_errors_name_the_field_the_client_sent(url: str, body: dict[str, Any], param: str) -> None:
    assert_refused(post(url, "/v1/chat/completions", {"messages": HI, **body}), param)


@pytest.mark.parametrize("part", [{"type": "text"}, {"type": "text", "text": 5}, {"type": "text", "text": None}])
def test_a_text_part_needs_string_text(url: str, part: dict[str, Any]) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]
    assert_refused(post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 2}), "messages.0.content")
    assert_refused(post(url, "/tokenize", {"messages": messages}), "messages.0.content")


def test_tool_messages_need_their_tool_call_id(url: str) -> None:
    answer = {"role": "tool", "content": "42"}
    for path in ("/v1/chat/completions", "/tokenize"):
        assert_refused(post(url, path, {"messages": [*HI, CALL, answer]}), "messages.2.tool_call_id")
        assert_refused(post(url, path, {"messages": [*HI, CALL, {**answer, "tool_call_id": 1}]}),
                       "messages.2.tool_call_id")
        assert_refused(post(url, path, {"messages": [{**HI[0], "name": 5}]}), "messages.0.name")
    assert_completion(post(url, "/v1/chat/completions", {
        "messages": [{**HI[0], "name": "bob"}, CALL, {**answer, "tool_call_id": "call_1"}], "max_tokens": 2}),
        chat=True)
