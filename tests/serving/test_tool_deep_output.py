"""A model output nested deeper than Python's recursion limit (the model repeating "[" in a call's arguments, cut by
max_tokens) made the tool call parsers raise RecursionError (they caught JSONDecodeError only): the answer was a 500
with a traceback. Now such output is no JSON to them: a required call keeps its arguments as written, with
finish_reason "length", whole and streamed. Through a real instance: tool_choice required over a recursive-array
parameter, and a logit_bias towards "["."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from tests.serving.helpers import in_process_instance

NESTED = {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}, "required": ["a"],
          "$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}
pytestmark = pytest.mark.slow  # ~1 min: 1200 tokens of the tiny model on CPU, twice

MAX_TOKENS = 1200  # "[" tokens past the recursion limit (1000)
TIMEOUT = 600.0


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": 2048}, "cache": {"num_gpu_blocks": 256},
        "security": {"deployment_secret": "deep-output-secret-0123456789"}})
    with in_process_instance(cfg, "deep-output-0") as (address, _):
        yield address


def _body(url: str, stream: bool) -> dict[str, Any]:
    [bracket] = httpx.post(f"{url}/tokenize", timeout=TIMEOUT,
                           json={"prompt": "[", "add_special_tokens": False}).json()["tokens"]
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "tools": [{"type": "function", "function": {"name": "f", "parameters": NESTED}}],
            "tool_choice": "required", "logit_bias": {str(bracket): 100}, "stream": stream}


def test_a_deeply_nested_cut_call_is_a_length_answer_not_a_500(url: str) -> None:
    answer = httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT, json=_body(url, False))
    assert answer.status_code == 200, answer.text[:300]
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "length", str(choice)[:300]
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "f"
    arguments = call["function"]["arguments"]
    assert arguments.replace(" ", "").startswith('{"a":' + "[" * 1000), arguments[:80]  # as written: not JSON


def test_a_deeply_nested_cut_call_streams_to_a_length_finish(url: str) -> None:
    calls, finish = [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=TIMEOUT, json=_body(url, True)) as answer:
        assert answer.status_code == 200, answer.read()[:300]
        for line in answer.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, line[:300]
                for choice in event["choices"]:
                    calls += choice["delta"].get("tool_calls") or []
                    finish = choice["finish_reason"] or finish
    assert finish == "length" and [c["function"]["name"] for c in calls] == ["f"], (finish, str(calls)[:300])
