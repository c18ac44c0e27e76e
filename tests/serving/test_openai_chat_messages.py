"""Chat messages reach the chat template as vLLM's OpenAI server passes them, through a real instance's HTTP API
(tiny model, CPU, in this process, a template that shows what it gets): the prompt a chat request sends (its
`prompt_token_ids` with `return_token_ids`) is the text a client gets from vLLM for the same messages.

- A message's text parts are joined one a line (vLLM's "\\n".join for a template that takes string content):
  they were run together, `[{"text": "a"}, {"text": "b"}]` read as "ab".
- Parts vLLM reads as text besides `text` (OpenAI's `refusal` of an assistant message, the Responses API's
  `input_text` / `output_text`) are text too: they were a 400 saying the server "serves a text model".
- An assistant's `reasoning` / `reasoning_content` (a reasoning model's earlier thinking, which clients send back
  between tool calls, and Qwen3's template renders in <think>) reaches the template under both names: it was
  dropped without a word.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from tests.serving.helpers import in_process_instance

TIMEOUT = 120.0  # a loaded 2-core machine
# Every message as <role>content</role>; an assistant's reasoning, under each name the template reads, before it.
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>"
            "{% if m.reasoning_content is defined %}[{{ m.reasoning_content }}|{{ m.reasoning }}]{% endif %}"
            "{{ m.content }}</{{ m.role }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    template = tmp_path_factory.mktemp("template") / "shows.jinja"
    template.write_text(TEMPLATE)
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": 256, "chat_template": str(template)},
        "cache": {"num_gpu_blocks": 64, "block_size": 8},
        "security": {"deployment_secret": "test-deployment-secret-0123456789"},
    })
    with in_process_instance(cfg, "chat-messages-0") as (address, _):
        yield address


def _chat(url: str, messages: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT, json={
        "model": "tiny", "messages": messages, "max_tokens": 1, "return_token_ids": True})


def _sent(url: str, messages: list[dict[str, Any]]) -> list[int]:
    """The token ids a chat request with `messages` sends the engine, as its answer reports them."""
    answer = _chat(url, messages)
    assert answer.status_code == 200, answer.text
    ids: list[int] = answer.json()["prompt_token_ids"]
    return ids


def _ids(url: str, text: str) -> list[int]:
    """The token ids of a rendered prompt `text` (a chat request encodes its rendering so: no special tokens added)."""
    answer = httpx.post(f"{url}/tokenize", json={"model": "tiny", "prompt": text, "add_special_tokens": False},
                        timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    ids: list[int] = answer.json()["tokens"]
    return ids


def test_text_parts_are_joined_one_a_line(url: str) -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    assert _sent(url, [{"role": "user", "content": parts}]) == _ids(url, "<user>Hello\nworld</user><assistant>")


def test_refusal_and_responses_text_parts_are_text(url: str) -> None:
    messages = [{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Hi."},
                                                  {"type": "refusal", "refusal": "I cannot."}]}]
    assert _sent(url, messages) == _ids(url, "<user>Hello</user><assistant>Hi.\nI cannot.</assistant><assistant>")
    bad = _chat(url, [{"role": "assistant", "content": [{"type": "refusal", "text": "no"}]}])
    assert bad.status_code == 400, bad.text
    assert "part 0 is a refusal part without a string `refusal`" in bad.json()["error"]["message"], bad.text


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_an_assistants_reasoning_reaches_the_template(url: str, field: str) -> None:
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Sunny.", field: "look it up"},
                {"role": "user", "content": "Thanks", field: "a user's is not read"}]
    assert _sent(url, messages) == _ids(url, "<user>Weather?</user><assistant>[look it up|look it up]Sunny."
                                             "</assistant><user>Thanks</user><assistant>")
    bad = _chat(url, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", field: ["x"]}])
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == f"messages.1.{field}", bad.text
