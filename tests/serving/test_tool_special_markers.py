"""A checkpoint whose `<tool_call>` / `</tool_call>` are SPECIAL added tokens (Hermes 2 Pro / Hermes 3 on Llama 3
repurpose reserved special tokens for them). The output was decoded with the request's skip_special_tokens (default
true), so the markers vanished before the calls were parsed: a strict tool's call, which the grammar forced through
`<tool_call>`, came back as content. As vLLM's tool parsers do (hermes' adjust_request), a request whose tools may be
called (tool_choice not "none") is decoded with its special tokens, whatever skip_special_tokens the client sent;
under "none" the client's choice (default: skipped) stands. An EOS still adds no text.

Through a real instance's HTTP API: the tiny checkpoint with both markers as special tokens, a logit_bias towards
`<tool_call>` then EOS (test_tool_strict_auto.py's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdlaunch.model.demo_tokenizer import EOS_TOKEN_ID
from tests.serving.test_tool_strict_auto import (
    A,
    _chat,
    _streamed,
    _tool,
    marker_checkpoint,
    marker_instance,
    served_marker_bias,
)

ANSWER = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return marker_checkpoint(tmp_path_factory.mktemp("special-markers"), special=True)


@pytest.fixture(scope="module")
def url(checkpoint: Path) -> Iterator[str]:
    with marker_instance(checkpoint, "special-markers-0") as address:
        yield address


@pytest.fixture(scope="module", name="bias")
def _bias(url: str, checkpoint: Path) -> dict[str, float]:
    return served_marker_bias(url, checkpoint)


@pytest.mark.parametrize("extra", [
    {},
    {"skip_special_tokens": True},  # sent explicitly: overridden as vLLM overrides it
    {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}}},
], ids=["default", "skip-true-sent", "beside-response-format"])
def test_a_strict_call_through_special_markers_is_a_tool_call(url: str, checkpoint: Path, bias: dict[str, float],
                                                              extra: dict[str, Any]) -> None:
    body = {"tools": [_tool("f", A, {"strict": True})], "parallel_tool_calls": False, "logit_bias": bias, **extra}
    whole = _chat(url, checkpoint.name, body)
    assert [c["function"]["name"] for c in whole["message"]["tool_calls"]] == ["f"], whole
    assert whole["finish_reason"] == "tool_calls", whole
    assert not whole["message"]["content"], whole  # no marker, no EOS text
    content, calls, finish = _streamed(url, checkpoint.name, body)
    assert (content, [c["function"]["name"] for c in calls if "name" in c["function"]], finish) == (
        "", ["f"], "tool_calls")


def test_tool_choice_none_keeps_the_clients_skip_special_tokens(url: str, checkpoint: Path,
                                                                bias: dict[str, float]) -> None:
    """Nothing is parsed under none (vLLM leaves the request as sent): the markers are skipped by default, kept when
    the client asks."""
    body = {"tools": [_tool("f", A, {"strict": True})], "tool_choice": "none", "logit_bias": bias}
    skipped = _chat(url, checkpoint.name, body)
    assert "<tool_call>" not in skipped["message"]["content"] and not skipped["message"]["tool_calls"], skipped
    kept = _chat(url, checkpoint.name, {**body, "skip_special_tokens": False})
    assert kept["message"]["content"].startswith("<tool_call>"), kept


@pytest.mark.parametrize("stream", [False, True])
def test_an_eos_adds_no_text_when_special_tokens_are_kept(url: str, checkpoint: Path, stream: bool) -> None:
    body = {"tools": [_tool("f", A, {})], "logit_bias": {str(EOS_TOKEN_ID): 100.0}}
    if stream:
        assert _streamed(url, checkpoint.name, body) == ("", [], "stop")
    else:
        whole = _chat(url, checkpoint.name, body)
        assert (whole["message"]["content"], whole["finish_reason"]) == ("", "stop"), whole
