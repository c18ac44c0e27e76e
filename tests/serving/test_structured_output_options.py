"""Structured-output options through a real instance's HTTP API (tiny model, CPU, in this process):

- `structured_outputs.disable_any_whitespace: false` allows whitespace between JSON tokens whichever field asked
  for the JSON (as vLLM folds response_format into structured_outputs): it applied only to a constraint inside
  structured_outputs, and with response_format, guided_json or a forced tool call it was accepted and ignored.

The whitespace is made visible with a logit_bias on the space token: greedy decoding takes it wherever the grammar
allows it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

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
