"""Where structured output ends, through a real instance's HTTP API (tiny model, CPU, in this process), as vLLM's:

- A grammar that is complete does not end the request at its last token: it then allows only EOS, the model samples
  it, and that EOS is an output token (usage.completion_tokens, token_ids, a logprobs entry of logprob 0.0, the only
  allowed token) with finish_reason "stop" and stop_reason null; its text is left out unless
  include_stop_str_in_output. The request stopped without it, one completion token short of vLLM's count.
- min_tokens past a grammar that completes sooner (guided_choice, min_tokens 8) ends at the grammar's end with that
  EOS (vLLM lets a complete grammar's EOS through min_tokens); holding it back left no token to sample.
- A grammar past llguidance's limits (`a{1000000}`, a pattern of a JSON schema, 2,500 guided choices) is a 400 naming
  its field before anything runs, streamed or not: it passed the check and failed at its first output token with
  "the grammar rejected output token 97". One that reaches a limit deeper in its output says it is too large.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.http.sse import parse_sse
from tests.serving.helpers import in_process_instance, tiny_colocated

TIMEOUT = 120.0  # a loaded 2-core machine
CHOICES = ["yes", "no"]
ROUTES = {"/v1/completions": {"prompt": "pick one"},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": "pick one"}]}}


@pytest.fixture(scope="module")
def instance() -> Iterator[tuple[str, int, str]]:
    """(URL, the EOS id a grammar ends with, that EOS's text)."""
    with in_process_instance(tiny_colocated(256), "structured-end-0") as (address, loop):
        eos = loop.engine.tokenizer.eos_token_ids[0]
        text = httpx.post(f"{address}/detokenize", json={"tokens": [eos]}, timeout=TIMEOUT).json()["prompt"]
        yield address, eos, text


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=TIMEOUT, json={
        "model": "tiny", "temperature": 0, "max_tokens": 16, **ROUTES[path], **body})


def _answer(url: str, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the one choice, usage) of a whole answer."""
    answer = _post(url, path, body)
    assert answer.status_code == 200, answer.text
    (choice,) = answer.json()["choices"]
    return choice, answer.json()["usage"]


@pytest.mark.parametrize("path", list(ROUTES))
def test_a_complete_grammar_ends_with_its_eos_counted(instance: tuple[str, int, str], path: str) -> None:
    url, eos, _ = instance
    chat = path.endswith("chat/completions")
    logprobs: dict[str, Any] = {"logprobs": True, "top_logprobs": 1} if chat else {"logprobs": 1}
    choice, usage = _answer(url, path, {"guided_choice": CHOICES, "return_token_ids": True, **logprobs})
    text = choice["message"]["content"] if chat else choice["text"]
    assert text in CHOICES and choice["finish_reason"] == "stop" and choice["stop_reason"] is None, choice
    ids = choice["token_ids"]
    assert ids[-1] == eos and eos not in ids[:-1], ids
    assert usage["completion_tokens"] == len(ids), (usage, ids)
    entries = choice["logprobs"]["content"] if chat else choice["logprobs"]["token_logprobs"]
    assert len(entries) == len(ids), choice["logprobs"]
    last = entries[-1]["logprob"] if chat else entries[-1]
    assert last == 0.0, choice["logprobs"]  # EOS was all the complete grammar allowed


def test_the_grammar_eos_text_follows_include_stop_str_in_output(instance: tuple[str, int, str]) -> None:
    url, eos, eos_text = instance
    path, asked = "/v1/completions", {"guided_choice": CHOICES, "skip_special_tokens": False}
    kept, _ = _answer(url, path, {**asked, "include_stop_str_in_output": True})
    dropped, _ = _answer(url, path, asked)
    assert dropped["text"] in CHOICES, dropped
    assert kept["text"] == dropped["text"] + eos_text, (kept, eos_text)


def test_the_grammar_eos_is_counted_in_a_stream(instance: tuple[str, int, str]) -> None:
    url, eos, _ = instance
    answer = _post(url, "/v1/completions", {"guided_choice": CHOICES, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert answer.status_code == 200, answer.text
    events = [json.loads(e) for e in parse_sse(answer.content) if e != "[DONE]"]
    choices = [c for e in events for c in e["choices"]]
    assert "".join(c["text"] for c in choices) in CHOICES and choices[-1]["finish_reason"] == "stop", choices
    whole, usage = _answer(url, "/v1/completions", {"guided_choice": CHOICES, "return_token_ids": True})
    assert whole["token_ids"][-1] == eos, whole
    assert events[-1]["usage"]["completion_tokens"] == usage["completion_tokens"] == len(whole["token_ids"])


@pytest.mark.parametrize("path", list(ROUTES))
def test_min_tokens_past_a_complete_grammar_ends_at_its_eos(instance: tuple[str, int, str], path: str) -> None:
    url, eos, _ = instance
    choice, usage = _answer(url, path, {"guided_choice": CHOICES, "min_tokens": 8, "return_token_ids": True})
    text = choice["message"]["content"] if path.endswith("chat/completions") else choice["text"]
    assert text in CHOICES and choice["finish_reason"] == "stop", choice
    assert choice["token_ids"][-1] == eos and usage["completion_tokens"] == len(choice["token_ids"]) < 8, choice


def test_past_the_grammar_eos_ignore_eos_runs_unconstrained(instance: tuple[str, int, str]) -> None:
    """vLLM's: with ignore_eos the complete grammar's EOS ends nothing, and the grammar is over (terminated)."""
    url, eos, _ = instance
    choice, _ = _answer(url, "/v1/completions", {"guided_choice": CHOICES, "return_token_ids": True})
    ids = choice["token_ids"]
    free, _ = _answer(url, "/v1/completions", {"guided_choice": CHOICES, "return_token_ids": True,
                                               "ignore_eos": True, "max_tokens": len(ids) + 6})
    assert free["finish_reason"] == "length" and free["token_ids"][:len(ids)] == ids, (free, ids)
    assert free["text"].startswith(choice["text"]) and any(t != eos for t in free["token_ids"][len(ids):]), free


def test_max_tokens_at_the_grammar_last_token_is_length(instance: tuple[str, int, str]) -> None:
    """The grammar's last token is no stop (its EOS is): max_tokens reached there ends with "length", as vLLM's."""
    url, _, _ = instance
    choice, _ = _answer(url, "/v1/completions", {"guided_choice": CHOICES, "return_token_ids": True})
    cut, _ = _answer(url, "/v1/completions", {"guided_choice": CHOICES, "max_tokens": len(choice["token_ids"]) - 1})
    assert cut["text"] == choice["text"] and cut["finish_reason"] == "length", (cut, choice)


TOO_LARGE = "a{1000000}"
PATTERN_SCHEMA = {"type": "string", "pattern": f"^{TOO_LARGE}$"}


@pytest.mark.parametrize(("fields", "param"), [
    ({"guided_regex": TOO_LARGE}, "guided_regex"),
    ({"structured_outputs": {"regex": TOO_LARGE}}, "structured_outputs.regex"),
    ({"guided_json": PATTERN_SCHEMA}, "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": PATTERN_SCHEMA}}},
     "response_format.json_schema.schema"),
    ({"guided_choice": [f"choice {i}" for i in range(2500)]}, "guided_choice"),  # a parser row of 2,500 items
])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_grammar_past_llguidance_limits_is_a_400_naming_its_field(instance: tuple[str, int, str],
                                                                     fields: dict[str, Any], param: str,
                                                                     stream: bool) -> None:
    url, _, _ = instance
    answer = _post(url, "/v1/completions", {**fields, "stream": stream})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and "too large" in error["message"], error
    assert "rejected output token" not in error["message"], error


def test_a_grammar_that_reaches_a_limit_deeper_says_it_is_too_large(instance: tuple[str, int, str]) -> None:
    """Its first 100 characters are free: the up-front probe does not reach the repetition, the output does."""
    url, _, _ = instance
    answer = _post(url, "/v1/completions", {"guided_regex": ".{100}" + TOO_LARGE, "max_tokens": 200})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "guided_regex", error
    assert "too large" in error["message"] and "at output token" in error["message"], error
