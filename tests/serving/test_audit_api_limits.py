"""The engine's refusals of a request (prompt + output limit past max_model_len, an empty prompt) as the client
sees them through a PD and a colocated `pdlaunch serve` (tiny model, CPU): they say how to fix the request and
name the fields the client sent. Before, the engine's hint ("shorten the prompt or lower max_tokens") was
dropped, and a chat request was told about `max_tokens` and `prompt`, fields it never sent, when it sent
`max_completion_tokens` and `messages`. And `echo` with `max_tokens: 0`, refused before, answers the prompt.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.serving.e2e import Serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TIMEOUT = 120.0  # a loaded 2-core machine
TOO_MANY = 2045  # with the chat template around "hi", past the tiny model's max_model_len of 2048
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def deployments(pd_and_colocated_deployments: dict[str, Serve]) -> dict[str, Serve]:
    return pd_and_colocated_deployments  # tests/serving/conftest.py: one pair for every module that compares them


@pytest.mark.parametrize(("path", "body", "param", "says"), [
    ("/v1/chat/completions", {"messages": HI, "max_completion_tokens": TOO_MANY}, "messages",
     [f" + max_completion_tokens ({TOO_MANY}) = ", "(shorten the messages or lower max_completion_tokens)"]),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": TOO_MANY}, "messages",
     [f" + max_tokens ({TOO_MANY}) = ", "(shorten the messages or lower max_tokens)"]),
    ("/v1/completions", {"prompt": "hi", "max_tokens": TOO_MANY + 3}, "prompt",
     [f" + max_tokens ({TOO_MANY + 3}) = ", "(shorten the prompt or lower max_tokens)"]),
    ("/v1/completions", {"prompt": [[]], "max_tokens": 4}, "prompt", ["the prompt is empty (send at least one token)"]),
    # no limit named: the answer may fill the context, and the prompt leaves it no room
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a " * 2100}]}, "messages",
     ["the messages (", " tokens) leave no room for an answer within max_model_len 2048: shorten the messages"]),
    ("/v1/completions", {"prompt": [5] * 2048, "max_tokens": None}, "prompt",
     ["the prompt (2048 tokens) leaves no room for an answer within max_model_len 2048: shorten the prompt"]),
    # no max_tokens in a completion: 16 (through PD too, where the prefill leg asked for 1)
    ("/v1/completions", {"prompt": [5] * 2048}, "prompt", [" + max_tokens (16) = 2064 "]),
], ids=["chat-max_completion_tokens", "chat-max_tokens", "completion-too-long", "completion-empty-token-ids",
        "chat-no-limit", "completion-max_tokens-null", "completion-default-max_tokens"])
@pytest.mark.parametrize("deployment", ["pd", "colocated"])
def test_a_refusal_names_the_sent_fields_and_the_fix(deployments: dict[str, Serve], deployment: str, path: str,
                                                     body: dict[str, Any], param: str, says: list[str]) -> None:
    answer = httpx.post(deployments[deployment].url + path, json={"model": "tiny", **body}, timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param, error
    assert all(part in error["message"] for part in says), error
    if any("no room" in part for part in says):  # no limit was sent: none is named (it read "+ max_tokens (1)")
        assert "max_tokens" not in error["message"] and "max_completion_tokens" not in error["message"], error


@pytest.mark.parametrize("deployment", ["pd", "colocated"])
def test_echo_with_max_tokens_0_answers_the_prompt(deployments: dict[str, Serve], deployment: str) -> None:
    """echo with max_tokens 0 (vLLM's "echo without generation"): the prompt, no output token, through PD as
    colocated (before: a 400 "Input should be greater than or equal to 1")."""
    prompt = "Score this prompt"
    answer = httpx.post(deployments[deployment].url + "/v1/completions", timeout=TIMEOUT, json={
        "model": "tiny", "prompt": prompt, "echo": True, "max_tokens": 0})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["choices"][0]["text"] == prompt and body["usage"]["completion_tokens"] == 0, body
