"""Where an instance prepares a request before the engine gets it: a short one's choices and tokens on the event
loop, since each hand-over to a worker thread and back cost it ~0.3 ms (idle 2-core CPU) to several ms (busy) of
its time to first token; a long prompt, a chat of many messages and a request whose grammar compiles in a worker
thread, where they cannot hold every other stream of the instance. A real instance (tiny model, CPU, in process)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.server import completions, prompts
from tests.serving.helpers import in_process_instance, on_event_loop

TIMEOUT = 120.0  # a loaded 2-core machine


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    config = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": 2048}, "cache": {"num_gpu_blocks": 512, "block_size": 8}})
    # Room for a request of INLINE_CHOICES + 1 samples whose first is still running when the others are submitted
    # (the helper's default, 16 pending, answered that request 503 when the first had not finished by then).
    with in_process_instance(config, "request-preparation-0", max_pending_requests=64) as (address, _):
        yield address


@pytest.fixture()
def where(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[bool]]:
    """Whether each request's choices were prepared, and its prompts tokenized, on the event loop."""
    seen: dict[str, list[bool]] = {"choices": [], "tokenize": []}
    choices, tokenize = completions.Choices, prompts.tokenize

    def prepared(*args: Any) -> completions.Choices:
        seen["choices"].append(on_event_loop())
        return choices(*args)

    def tokenized(tokenizer: Any, prompt: prompts.Prompt) -> list[int]:
        seen["tokenize"].append(on_event_loop())
        return tokenize(tokenizer, prompt)

    monkeypatch.setattr(completions, "Choices", prepared)
    monkeypatch.setattr(prompts, "tokenize", tokenized)
    return seen


def _post(url: str, path: str, body: dict[str, Any], status: int = 200) -> httpx.Response:
    answer = httpx.post(f"{url}{path}", json={"model": "tiny", "max_tokens": 2, **body}, timeout=TIMEOUT)
    assert answer.status_code == status, answer.text
    return answer


@pytest.mark.parametrize("stream", [False, True])
def test_a_short_request_is_prepared_on_the_event_loop(url: str, where: dict[str, list[bool]], stream: bool) -> None:
    _post(url, "/v1/completions", {"prompt": "the weather today", "stream": stream})
    _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": stream})
    _post(url, "/v1/completions", {"prompt": ["one", "two"], "n": 2})
    assert where == {"choices": [True, True, True], "tokenize": [True, True, True, True]}


def test_a_long_prompt_is_tokenized_in_a_worker_thread(url: str, where: dict[str, list[bool]]) -> None:
    long_text = "ab " * (prompts.INLINE_PROMPT_CHARS // 3 + 1)  # past the tiny model's 2048 tokens: tokenized, then
    for path, body in (("/v1/completions", {"prompt": long_text}),  # refused by the engine
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]})):
        assert "max_model_len" in _post(url, path, body, status=400).json()["error"]["message"]
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"}
            for i in range(prompts.INLINE_CHAT_MESSAGES + 1)]
    _post(url, "/v1/chat/completions", {"messages": many})
    assert where["tokenize"] == [False, False, False]
    assert where["choices"] == [True, True, True]  # their bodies are small: no grammar, few choices


def test_a_request_with_a_grammar_or_many_choices_is_prepared_in_a_worker_thread(
        url: str, where: dict[str, list[bool]]) -> None:
    _post(url, "/v1/completions", {"prompt": "pick", "guided_choice": ["yes", "no"]})
    _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "pick"}],
                                        "response_format": {"type": "json_object"}})
    _post(url, "/v1/completions", {"prompt": "many", "n": completions.INLINE_CHOICES + 1})
    assert where["choices"] == [False, False, False]


def test_many_short_prompts_of_one_request_are_tokenized_in_worker_threads(
        url: str, where: dict[str, list[bool]]) -> None:
    """Each prompt of a list is short, together they are not: 128 prompts of 8,192 characters (a ~1 MB body) held
    the event loop ~0.5 s when each short one was tokenized there, every other stream of the instance waiting."""
    each = prompts.INLINE_PROMPT_CHARS // 4 + 1  # past the tiny model's 2048 tokens (a token per "a"): tokenized,
    many = ["a" * each] * 4                       # then refused by the engine
    assert "max_model_len" in _post(url, "/v1/completions", {"prompt": many}, status=400).json()["error"]["message"]
    assert where["tokenize"] == [False] * len(many)
