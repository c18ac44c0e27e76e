"""A checkpoint whose `<tool_call>` / `</tool_call>` are SPECIAL added tokens (Hermes 2 Pro / Hermes 3 on Llama 3
repurpose reserved special tokens for them). The output was decoded with the request's skip_special_tokens (default
true), so the markers vanished before the calls were parsed: a strict tool's call, which the grammar forced through
`<tool_call>`, came back as content. As vLLM's hermes parser does (its adjust_request), on such a checkpoint a request
whose tools may be called (tool_choice not "none") is decoded with its special tokens, whatever skip_special_tokens
the client sent; under "none" the client's choice (default: skipped) stands. An EOS still adds no text. A checkpoint
whose markers are not special (or that has none: Llama 3) decodes as the client sent, tools or not.

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


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return marker_checkpoint(tmp_path_factory.mktemp("plain-markers"), special=False)


@pytest.fixture(scope="module")
def plain_url(plain_checkpoint: Path) -> Iterator[str]:
    with marker_instance(plain_checkpoint, "plain-markers-0") as address:
        yield address


@pytest.mark.parametrize(("extra", "kept"), [({}, False), ({"skip_special_tokens": True}, False),
                                             ({"skip_special_tokens": False}, True)],
                         ids=["default", "skip-true-sent", "skip-false-sent"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_checkpoint_without_special_markers_decodes_as_the_client_sent(
        plain_url: str, plain_checkpoint: Path, extra: dict[str, Any], kept: bool, stream: bool) -> None:
    """Markers that are no special tokens (Qwen's), or none (Llama 3's llama3_json): nothing skipping would strip
    from a call, so vLLM's parsers leave skip_special_tokens as sent (default: skipped). A special token the model
    writes (here <|user|>) is skipped unless the client asked to keep it. It used to be kept for every tool-enabled
    chat, and a Llama 3 answer then carried special tokens vLLM's never does."""
    user = str(EOS_TOKEN_ID + 2)  # <|user|>: special, not a stop token
    body = {"tools": [_tool("f", A, {})], "logit_bias": {user: 100.0}, "max_tokens": 3, **extra}
    content = _streamed(plain_url, plain_checkpoint.name, body)[0] if stream else \
        _chat(plain_url, plain_checkpoint.name, body)["message"]["content"]
    assert content == ("<|user|>" * 3 if kept else ""), content
