"""Every vLLM / OpenAI request field is honoured or refused: each refused one is a 400 naming it
when it asks for something, and passes at its neutral value; each honoured one reaches the
engine's SamplingParams (their effect on outputs: test_openai_sampling_e2e.py)."""

from __future__ import annotations

from typing import Any

import pytest

from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.completion_request import CompletionRequest
from pdlaunch.server.unsupported_fields import _COMMON, CHAT_ONLY, COMPLETION_ONLY

ASKING: dict[str, Any] = {
    "use_beam_search": True, "length_penalty": 0.5, "truncate_prompt_tokens": 5, "prompt_logprobs": 1,
    "guided_decoding_backend": "xgrammar", "guided_whitespace_pattern": " ", "logits_processors": ["x"],
    "return_tokens_as_token_ids": True, "priority": 1, "cache_salt": "s", "vllm_xargs": {"a": 1},
    "prompt_embeds": "AAAA", "mm_processor_kwargs": {"a": 1}, "request_id": "r", "store": True,
    "service_tier": "flex", "suffix": "end", "add_special_tokens": False, "best_of": 2, "echo": True,
    "functions": [{"name": "f"}], "function_call": "auto", "reasoning_effort": "low",
    "audio": {"voice": "x"}, "modalities": ["audio"], "prediction": {"type": "content"},
    "web_search_options": {}, "verbosity": "low", "chat_template": "{{ messages }}",
    "structural_tag": "{}", "logprob_token_ids": [5, 6], "thinking_token_budget": 1,
    "repetition_detection": {"max_pattern_size": 2, "min_count": 2}, "watermarking": True, "truncation_side": "middle",
    "routed_experts_prompt_start": 1, "ec_transfer_params": {"a": 1},
    "media_io_kwargs": {"image": {}}, "return_prompt_text": True,
}
MESSAGES = [{"role": "user", "content": "hi"}]


def build(chat: bool, **fields: Any) -> CompletionRequest | ChatCompletionRequest:
    if chat:
        return ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})
    return CompletionRequest.model_validate({"prompt": "hi", **fields})


CASES = [(name, False) for name in {**_COMMON, **COMPLETION_ONLY}] + [(name, True) for name in {**_COMMON, **CHAT_ONLY}]


@pytest.mark.parametrize(("field", "chat"), CASES)
def test_refused_field_is_a_400_naming_it(field: str, chat: bool) -> None:
    with pytest.raises(OpenAIError) as info:
        build(chat, **{field: ASKING[field]}).sampling_params()
    assert info.value.status == 400 and info.value.param == field


@pytest.mark.parametrize(("field", "chat"), [c for c in CASES if {**_COMMON, **COMPLETION_ONLY, **CHAT_ONLY}[c[0]]])
def test_refused_field_at_its_neutral_value_passes(field: str, chat: bool) -> None:
    neutral = {**_COMMON, **(CHAT_ONLY if chat else COMPLETION_ONLY)}[field][0]
    build(chat, **{field: neutral}).sampling_params()


HONOURED = {
    "max_tokens": 7, "temperature": 0.5, "top_p": 0.5, "top_k": 3, "seed": 1, "stop": ["x"], "stop_token_ids": [2],
    "ignore_eos": True, "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.5, "min_p": 0.1,
    "min_tokens": 2, "logit_bias": {3: 1.0}, "allowed_token_ids": [1, 2], "bad_words": ["no"],
    "include_stop_str_in_output": True, "skip_special_tokens": False, "spaces_between_special_tokens": False,
}


@pytest.mark.parametrize("field", sorted(HONOURED))
@pytest.mark.parametrize("chat", [False, True])
def test_honoured_field_reaches_sampling_params(field: str, chat: bool) -> None:
    params = build(chat, **{field: HONOURED[field]}).sampling_params()
    assert getattr(params, field) == HONOURED[field]


def test_structured_output_fields_reach_sampling_params() -> None:
    for fields, kind in (({"response_format": {"type": "json_object"}}, "json_object"),
                         ({"guided_choice": ["a", "b"]}, "choice"), ({"structured_outputs": {"regex": "a+"}}, "regex"),
                         ({"guided_grammar": 'root ::= "a"'}, "grammar"),
                         ({"guided_json": {"type": "object"}}, "json")):
        spec = build(False, **fields).sampling_params().structured_output
        assert spec is not None and spec.kind == kind


def test_continuous_usage_stats_is_refused() -> None:
    with pytest.raises(OpenAIError) as info:
        build(False, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert info.value.param == "stream_options.continuous_usage_stats"


@pytest.mark.parametrize(("options", "usage"), [
    ({}, False), ({"include_obfuscation": False}, False), ({"include_usage": None}, False),
    ({"include_usage": True}, True), ({"include_usage": True, "continuous_usage_stats": None}, True)])
def test_include_usage_defaults_to_false_and_a_null_key_is_not_sent(options: dict[str, Any], usage: bool) -> None:
    """vLLM's StreamOptions (since vllm-project/vllm#36379), as OpenAI's: include_usage false unless sent true; both
    keys typed `bool | None`."""
    assert build(False, stream=True, stream_options=options).include_usage() is usage


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [{}, {"stream": False}, {"stream": None}], ids=["absent", "false", "null"])
@pytest.mark.parametrize("options", [{}, None])
def test_empty_or_null_stream_options_without_stream_pass(chat: bool, stream: dict[str, Any],
                                                          options: dict[str, Any] | None) -> None:
    """vLLM refuses stream_options without stream only when it is non-empty: a client that always sends
    `stream_options: {}` (or null) got a 400 here that vLLM does not give."""
    request = build(chat, **stream, stream_options=options)
    assert not request.stream and not request.include_usage()
    request.sampling_params()


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [{}, {"stream": False}, {"stream": None}], ids=["absent", "false", "null"])
@pytest.mark.parametrize("options", [{"include_usage": True}, {"include_usage": False}, {"include_usage": None},
                                     {"include_obfuscation": False}])
def test_non_empty_stream_options_without_stream_are_refused(chat: bool, stream: dict[str, Any],
                                                             options: dict[str, Any]) -> None:
    with pytest.raises(OpenAIError) as info:
        build(chat, **stream, stream_options=options)
    assert info.value.status == 400 and info.value.param == "stream_options"
    assert "stream: true" in info.value.message


@pytest.mark.parametrize(("chat", "limit"), [(True, "max_completion_tokens"), (True, "max_tokens"),
                                             (False, "max_tokens")])
def test_min_tokens_past_the_limit_names_the_limit_sent(chat: bool, limit: str) -> None:
    """A chat's limit sent as max_completion_tokens is named so when min_tokens exceeds it (the 400 said
    "must be less than or equal to max_tokens (3)", a field the client never sent)."""
    with pytest.raises(OpenAIError) as info:
        build(chat, **{limit: 3, "min_tokens": 5}).sampling_params()
    assert info.value.status == 400 and info.value.param == "min_tokens"
    assert info.value.message == f"min_tokens: min_tokens (5) must be less than or equal to {limit} (3)"
