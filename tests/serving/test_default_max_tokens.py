"""A request that names no output limit (vLLM's behaviour): chat without max_tokens / max_completion_tokens and a
completion whose max_tokens is null may run to max_model_len; a completion without the field gets 16 tokens.
A real instance (tiny model, CPU, max_model_len 96); the migration's continuation keeps the same meaning."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.proxy.continuation import continuation_body, max_tokens_of
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.completion_request import CompletionRequest
from pdlaunch.server.request_fields import DEFAULT_MAX_TOKENS
from tests.serving.helpers import in_process_instance, tiny_colocated

MAX_MODEL_LEN = 96
CHAT = [{"role": "user", "content": "Tell me a long story"}]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(tiny_colocated(MAX_MODEL_LEN), "default-max-tokens-0") as (address, _):
        yield address


def post(url: str, path: str, **body: Any) -> dict[str, Any]:
    answer = httpx.post(f"{url}{path}", json={"model": "tiny", "ignore_eos": True, "temperature": 0, **body},
                        timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_chat_without_a_limit_runs_to_max_model_len(url: str) -> None:
    for limit in ({}, {"max_tokens": None}, {"max_completion_tokens": None}):
        answer = post(url, "/v1/chat/completions", messages=CHAT, **limit)
        usage = answer["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == MAX_MODEL_LEN, (limit, usage)
        assert answer["choices"][0]["finish_reason"] == "length"


def test_a_chat_limit_still_applies(url: str) -> None:
    assert post(url, "/v1/chat/completions", messages=CHAT, max_tokens=5)["usage"]["completion_tokens"] == 5
    assert post(url, "/v1/chat/completions", messages=CHAT, max_completion_tokens=6)["usage"]["completion_tokens"] == 6


def test_a_completion_without_the_field_gets_16_and_null_fills_the_context(url: str) -> None:
    assert post(url, "/v1/completions", prompt="Once upon a time")["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
    usage = post(url, "/v1/completions", prompt="Once upon a time", max_tokens=None)["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == MAX_MODEL_LEN


def test_streamed_chat_without_a_limit_and_n_choices(url: str) -> None:
    answer = post(url, "/v1/chat/completions", messages=CHAT, n=2, temperature=1.0, seed=3)
    usage = answer["usage"]
    assert usage["completion_tokens"] == 2 * (MAX_MODEL_LEN - usage["prompt_tokens"])
    streamed = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": CHAT, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200 and f'"completion_tokens":{MAX_MODEL_LEN - usage["prompt_tokens"]}' in \
        streamed.text.replace(" ", "")


def test_min_tokens_beyond_the_room_left_is_a_400_naming_it(url: str) -> None:
    answer = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                        json={"model": "tiny", "messages": CHAT, "min_tokens": MAX_MODEL_LEN})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "min_tokens", answer.text


def test_the_request_models_say_which_requests_fill_the_context() -> None:
    assert ChatCompletionRequest.model_validate({"messages": CHAT}).fills_context()
    assert not ChatCompletionRequest.model_validate({"messages": CHAT, "max_tokens": 3}).fills_context()
    assert not ChatCompletionRequest.model_validate({"messages": CHAT, "max_completion_tokens": 3}).fills_context()
    assert not CompletionRequest.model_validate({"prompt": "x"}).fills_context()
    assert CompletionRequest.model_validate({"prompt": "x", "max_tokens": None}).fills_context()
    assert not CompletionRequest.model_validate({"prompt": "x", "max_tokens": 4}).fills_context()


def test_a_migrated_continuation_keeps_the_limit_or_its_absence() -> None:
    ids = [1, 2, 3, 4]
    assert max_tokens_of({"messages": CHAT}, chat=True) is None
    assert continuation_body({"messages": CHAT}, True, ids, 2)["max_tokens"] is None
    assert continuation_body({"messages": CHAT, "max_completion_tokens": 10}, True, ids, 2)["max_tokens"] == 8
    assert continuation_body({"prompt": "x"}, False, ids, 2)["max_tokens"] == DEFAULT_MAX_TOKENS - 2
    assert continuation_body({"prompt": "x", "max_tokens": None}, False, ids, 2)["max_tokens"] is None
    assert continuation_body({"prompt": "x", "max_tokens": 3}, False, ids, 5)["max_tokens"] == 1


def test_a_cache_smaller_than_max_model_len_bounds_the_room() -> None:
    """A KV cache that holds fewer tokens than max_model_len (sized by memory, not checked against it): a
    request without a limit runs until the cache is full for it, instead of a 400 for blocks it cannot have."""
    blocks, block_size = 12, 8  # 96 tokens, against the tiny model's longer max_position_embeddings
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}], "model": {"path": "tiny"},
        "cache": {"num_gpu_blocks": blocks, "block_size": block_size},
        "security": {"deployment_secret": "test-deployment-secret-0123456789"},
    })
    with in_process_instance(cfg, "small-cache-0") as (address, loop):
        assert loop.engine.max_model_len > blocks * block_size
        assert loop.engine.longest_request == blocks * block_size
        usage = post(address, "/v1/chat/completions", messages=CHAT)["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == blocks * block_size
