"""OpenAI request bodies -> engine inputs, and the 400s that name the offending parameter."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.completion_request import CompletionRequest


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("hello", "hello"), ([1, 2, 3], [1, 2, 3]), (["hello"], "hello"), ([[4, 5]], [4, 5])],
)
def test_single_prompt_forms(prompt: object, expected: object) -> None:
    assert CompletionRequest(prompt=prompt).single_prompt() == expected


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "echo": True, "logprobs": 1, "stream": True}, "echo"),
    ({"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
])
def test_unsupported_requests_name_the_param(body: dict, param: str) -> None:
    with pytest.raises(OpenAIError) as err:  # fields we cannot honour are refused while validating
        CompletionRequest(**body).single_prompt()
    assert err.value.status == 400
    assert err.value.param == param


def test_sampling_fields_map_onto_sampling_params() -> None:
    params = CompletionRequest(
        prompt="x", max_tokens=7, temperature=0.0, top_p=0.5, top_k=3, seed=11, stop="END",
        stop_token_ids=[9], ignore_eos=True, logprobs=2, some_unknown_field=1,
    ).sampling_params()
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (7, 0.0, 0.5, 3, 11)
    assert params.stop == ["END"] and params.stop_token_ids == [9] and params.ignore_eos
    assert params.logprobs == 2


def test_defaults_leave_engine_defaults() -> None:
    params = CompletionRequest(prompt="x").sampling_params()
    assert params.max_tokens == 16 and params.temperature == 1.0 and params.stop == []


@pytest.mark.parametrize(("field", "value"), [("temperature", -1.0), ("max_tokens", 0), ("top_p", 1.5)])
def test_invalid_sampling_value_is_a_400_naming_it(field: str, value: float) -> None:
    with pytest.raises(OpenAIError) as err:
        CompletionRequest(prompt="x", **{field: value}).sampling_params()
    assert err.value.status == 400 and err.value.param == field


def test_chat_max_completion_tokens_wins_and_logprobs_map() -> None:
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                    max_completion_tokens=3, logprobs=True, top_logprobs=2)
    params = request.sampling_params()
    assert params.max_tokens == 3 and params.logprobs == 2
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]).sampling_params().logprobs is None


def test_chat_text_content_parts_are_joined_and_images_refused() -> None:
    request = ChatCompletionRequest(messages=[
        {"role": "system", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ])
    expected = [{"role": "system", "content": ""}, {"role": "user", "content": "a\nb"}]
    assert request.template_messages().messages == expected
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    assert err.value.errors()[0]["loc"] == ("messages", 0, "content")
