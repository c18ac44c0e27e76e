"""Repros of where pdlaunch's OpenAI API parts from vLLM's as vLLM takes requests in 2026 (its
vllm/entrypoints/openai/completion/protocol.py, chat_completion/protocol.py, generate/base/protocol.py and
vllm/sampling_params.py), each a strict xfail: it passes once the gap is closed, and strict makes that XPASS a
failure, so whoever closes it drops the mark. Real HTTP against the tiny model on CPU, one colocated instance.

- `stream_options: {}` still gets a usage chunk (`choices: []`): vLLM's StreamOptions.include_usage defaults to
  false since vllm-project/vllm#36379 (merged 2026-03), as OpenAI's, so `{}` (or OpenAI's newer
  `{"include_obfuscation": false}`) asks for none; a client loop reading `chunk.choices[0]` breaks on it.
- `include_reasoning: true`, vLLM's default (a no-op without a reasoning parser), is a 400.
- vLLM fields added by 2026 are ignored with only a log line, against the README's "every request field vLLM
  knows is either honoured or refused": `logprob_token_ids` (the answer carries other logprobs than those
  asked), `thinking_token_budget`, `repetition_detection`, `watermarking`; the README table's list of vLLM's
  fields (tests/test_readme_fields.py VLLM_FIELDS) lacks them and says completions have no `bad_words`.
- `stream_options` keys sent as null (vLLM types them `bool | None`) are a 400.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.serving.helpers import tiny_instance

TIMEOUT = 120.0  # a loaded 2-core machine
HI = [{"role": "user", "content": "hi"}]
PATHS = ["/v1/completions", "/v1/chat/completions"]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with tiny_instance("revapi") as instance_url:
        yield instance_url


def body_for(path: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"prompt": "hello"} if path == "/v1/completions" else {"messages": HI}
    return {**base, "max_tokens": 3, **fields}


def events(answer: httpx.Response) -> list[dict[str, Any]]:
    """The JSON events of a server-sent event stream, [DONE] left out."""
    assert answer.status_code == 200, answer.text
    lines = [line[len("data: "):] for line in answer.text.splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", answer.text
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.xfail(strict=True, reason="revapi: logprob_token_ids is silently ignored (other logprobs come back)")
def test_logprob_token_ids_is_honoured_or_refused(url: str) -> None:
    asked = [5, 6]
    answer = httpx.post(f"{url}/v1/completions", json=body_for("/v1/completions", temperature=0, logprobs=1,
                                                               logprob_token_ids=asked), timeout=TIMEOUT)
    if answer.status_code == 400:
        assert answer.json()["error"]["param"] == "logprob_token_ids", answer.text
        return
    assert answer.status_code == 200, answer.text
    texts = {httpx.post(f"{url}/detokenize", json={"tokens": [t]}, timeout=TIMEOUT).json()["prompt"] for t in asked}
    logprobs = answer.json()["choices"][0]["logprobs"]
    for chosen, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True):
        assert set(top) == texts | {chosen}, (top, texts)  # vLLM: exactly those ids, and the sampled token


@pytest.mark.xfail(strict=True, reason="revapi: vLLM 2026 sampling fields are ignored with a log line only")
@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/chat/completions", "thinking_token_budget", 1),
    ("/v1/completions", "thinking_token_budget", 1),
    ("/v1/completions", "repetition_detection", {"max_pattern_size": 2, "min_count": 2}),
    ("/v1/chat/completions", "repetition_detection", {"max_pattern_size": 2, "min_count": 2}),
    ("/v1/completions", "watermarking", True),
])
def test_a_newer_vllm_field_that_asks_for_something_is_refused(url: str, path: str, field: str,
                                                                value: Any) -> None:
    answer = httpx.post(f"{url}{path}", json=body_for(path, **{field: value}), timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == field, answer.text


@pytest.mark.xfail(strict=True, reason="revapi: README's list of vLLM's request fields predates vLLM 2026's")
def test_the_readme_field_table_knows_vllms_2026_fields() -> None:
    from tests.test_readme_fields import VLLM_FIELDS

    newer = {"logprob_token_ids", "thinking_token_budget", "repetition_detection", "watermarking",
             "truncation_side", "stream_interval", "session_id"}
    assert newer <= set(VLLM_FIELDS), sorted(newer - set(VLLM_FIELDS))
    assert "completions" in VLLM_FIELDS["bad_words"]  # vLLM's CompletionRequest has had bad_words
