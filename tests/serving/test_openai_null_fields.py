"""A null is "not sent" for the fields OpenAI's schema makes nullable and vLLM types `... | None` (n, stream,
chat's logprobs, echo, return_token_ids), through a real instance's HTTP API (tiny model, CPU, in this process).
A client that writes every field, its unset ones as null, got a 400 "n: Input should be a valid integer" (or
"stream: Input should be a valid boolean") where OpenAI and vLLM answer. A null for a field vLLM does not make
nullable (ignore_eos) stays a 400 naming it. /tokenize's `return_token_strs: null` (vLLM's is nullable too) was
a 400 as well.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.serving.helpers import in_process_instance, tiny_colocated

TIMEOUT = 120.0  # a loaded 2-core machine
GREEDY = {"model": "tiny", "max_tokens": 2, "ignore_eos": True, "temperature": 0.0}
CHAT = {**GREEDY, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {**GREEDY, "prompt": "hi"}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(tiny_colocated(256), "null-fields-0") as (address, _):
        yield address


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/chat/completions", CHAT, "n"), ("/v1/chat/completions", CHAT, "stream"),
    ("/v1/chat/completions", CHAT, "logprobs"), ("/v1/chat/completions", CHAT, "return_token_ids"),
    ("/v1/completions", COMPLETION, "n"), ("/v1/completions", COMPLETION, "stream"),
    ("/v1/completions", COMPLETION, "echo"), ("/v1/completions", COMPLETION, "return_token_ids"),
])
def test_a_null_is_the_fields_default(url: str, path: str, body: dict[str, object], field: str) -> None:
    """The answer is the one to the body without the field: one choice, whole (not streamed), no logprobs, no
    echoed prompt, no token ids."""
    unsent = httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)
    answer = httpx.post(f"{url}{path}", json={**body, field: None}, timeout=TIMEOUT)
    assert answer.status_code == unsent.status_code == 200, answer.text
    assert answer.headers["content-type"] == unsent.headers["content-type"] == "application/json"
    assert answer.json()["choices"] == unsent.json()["choices"]
    assert len(answer.json()["choices"]) == 1


def test_a_null_where_vllm_takes_none_is_named(url: str) -> None:
    answer = httpx.post(f"{url}/v1/completions", json={**COMPLETION, "ignore_eos": None}, timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "ignore_eos"


@pytest.mark.parametrize("body", [{"prompt": "hi"}, {"messages": CHAT["messages"]}], ids=["prompt", "messages"])
def test_tokenize_takes_a_null_return_token_strs(url: str, body: dict[str, object]) -> None:
    answer = httpx.post(f"{url}/tokenize", json={**body, "return_token_strs": None}, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    assert answer.json()["token_strs"] is None and answer.json()["count"] > 0
