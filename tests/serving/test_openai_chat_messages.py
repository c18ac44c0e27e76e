"""Chat messages reach the chat template as vLLM's OpenAI server passes them, through a real instance's HTTP API
(tiny model, CPU, in this process): the prompt a chat request sends (its `prompt_token_ids` with
`return_token_ids`) is the one a client gets from vLLM for the same messages.

- A message's text parts are joined one a line (vLLM's "\\n".join for a template that takes string content):
  they were run together, `[{"text": "a"}, {"text": "b"}]` read as "ab".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.serving.helpers import in_process_instance, tiny_colocated

TIMEOUT = 120.0  # a loaded 2-core machine


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(tiny_colocated(256), "chat-messages-0") as (address, _):
        yield address


def _prompt_ids(url: str, messages: list[dict[str, Any]]) -> list[int]:
    """The token ids a chat request with `messages` sends the engine, as its answer reports them."""
    answer = httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT, json={
        "model": "tiny", "messages": messages, "max_tokens": 1, "return_token_ids": True})
    assert answer.status_code == 200, answer.text
    ids: list[int] = answer.json()["prompt_token_ids"]
    return ids


def test_text_parts_are_joined_one_a_line(url: str) -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    as_parts = _prompt_ids(url, [{"role": "user", "content": parts}])
    assert as_parts == _prompt_ids(url, [{"role": "user", "content": "Hello\nworld"}])
    assert as_parts != _prompt_ids(url, [{"role": "user", "content": "Helloworld"}])
