"""A strict tool's auto call through the proxy, PD (1P1D) and colocated, on CPU: the prefill leg samples its one
token under the same tool-calls grammar as the decode leg continues (both build it from the request), so the call
matches the schema and PD == colocated, whole and streamed (tests/serving/test_tool_strict_auto.py has the
checkpoint whose tokenizer holds `<tool_call>` as one token, and the logit_bias that makes the random model open a
call)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.serving.e2e import Serve
from tests.serving.test_tool_strict_auto import A, marker_bias, marker_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def deployments(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Serve]]:
    checkpoint = marker_checkpoint(tmp_path_factory.mktemp("tool-markers"))
    common = ["--model", str(checkpoint), "--num-gpu-blocks", "128", "--max-num-seqs", "8"]
    started: dict[str, Serve] = {}
    try:
        started["pd"] = Serve(tmp_path_factory.mktemp("pd"), [*common, "--prefill", "1", "--decode", "1"])
        started["colocated"] = Serve(tmp_path_factory.mktemp("colocated"), [*common, "--colocated"])
        yield {name: s.wait_ready() for name, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


def _calls(serve: Serve, asked: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, arguments) of the whole answer's calls, checked the same streamed; `asked`: the request's other
    constraint (response_format), joined to the calls' grammar."""
    model = httpx.get(f"{serve.url}/v1/models", timeout=5).json()["data"][0]["id"]
    tokens = httpx.post(f"{serve.url}/tokenize", timeout=30, json={"model": model, "prompt": "<tool_call>",
                                                                   "add_special_tokens": False}).json()["tokens"]
    client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=120, max_retries=0)
    kwargs: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": "Call f"}], "max_tokens": 48, "temperature": 0,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": A, "strict": True}}],
        "parallel_tool_calls": False, "logit_bias": marker_bias(tokens), **asked}
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls", whole
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls or []]
    streamed = [tc for c in client.chat.completions.create(stream=True, **kwargs) if c.choices
                for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(c.function.name, json.loads(c.function.arguments or "")) for c in streamed] == calls
    return calls


@pytest.mark.parametrize("asked", [{}, {"response_format": {"type": "json_schema", "json_schema": {
    "name": "answer", "schema": {"type": "object", "properties": {"x": {"type": "integer"}}}}}}])
def test_a_strict_tools_auto_call_matches_its_schema_pd_equals_colocated(deployments: dict[str, Serve],
                                                                         asked: dict[str, Any]) -> None:
    pd, colocated = _calls(deployments["pd"], asked), _calls(deployments["colocated"], asked)
    assert pd == colocated and [name for name, _ in pd] == ["f"]
    jsonschema.validate(pd[0][1], {**A, "additionalProperties": False})
