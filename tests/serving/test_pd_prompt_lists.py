"""A list of prompts in /v1/completions through the PD proxy (proxy/prompt_lists.py), real `pdlaunch serve`
processes with `--model tiny` on CPU: one PD request per prompt, merged into what a colocated instance
answers (choices indexed prompt * n + sample, text, token ids, finish reasons, usage), whole or streamed."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from pdlaunch.http.sse import parse_sse
from tests.serving.e2e import Serve

pytestmark = pytest.mark.e2e

PROMPTS = ["The capital of France is a city with", "Once upon a time in a small village", "Numbers: 1, 2, 3,"]
SEEDED = {"temperature": 1.0, "seed": 77}


@pytest.fixture
def deployments(pd_and_colocated_deployments: dict[str, Serve]) -> dict[str, Serve]:
    return pd_and_colocated_deployments  # tests/serving/conftest.py: one pair for every module that compares them


def _ask(serve: Serve, body: dict[str, Any]) -> dict[str, Any]:
    """Choices by index (text, token ids, finish reason) and the token counts of usage; a streamed
    answer is folded into the same shape."""
    response = httpx.post(serve.url + "/v1/completions", timeout=180, json={
        "model": "tiny", "return_token_ids": True, "max_tokens": 6, "ignore_eos": True, **body})
    assert response.status_code == 200, response.text
    choices: dict[int, dict[str, Any]] = {}
    usage: dict[str, Any] | None = None
    if body.get("stream"):
        events = [json.loads(d) for d in parse_sse(response.content) if d != "[DONE]"]
        assert parse_sse(response.content)[-1] == "[DONE]"
        assert len({e["id"] for e in events}) == 1
        assert sum(1 for e in events if e.get("usage")) == (1 if body.get("stream_options") else 0)
    else:
        answer = response.json()
        assert [c["index"] for c in answer["choices"]] == list(range(len(answer["choices"])))
        events = [answer]
    for event in events:
        assert "error" not in event, event
        usage = event.get("usage") or usage
        for c in event["choices"]:
            folded = choices.setdefault(c["index"], {"text": "", "token_ids": [], "finish_reason": None})
            folded["text"] += c["text"]
            folded["token_ids"] += c.get("token_ids") or []
            folded["finish_reason"] = c.get("finish_reason") or folded["finish_reason"]
    counts = {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} if usage else None
    return {"choices": dict(sorted(choices.items())), "usage": counts}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body", [
    {"prompt": PROMPTS, "temperature": 0.0},
    {"prompt": PROMPTS, "n": 2, **SEEDED},
    {"prompt": [[11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23]], "best_of": 3, "n": 2, **SEEDED},
], ids=["greedy", "n2-seeded", "token-ids-best-of"])
def test_pd_prompt_list_equals_colocated(deployments: dict[str, Serve], body: dict[str, Any], stream: bool) -> None:
    if stream and body.get("best_of"):
        pytest.skip("best_of is not streamable (as in vLLM)")
    body = {**body, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    pd, colocated = _ask(deployments["pd"], body), _ask(deployments["colocated"], body)
    n = body.get("n", 1)
    assert list(pd["choices"]) == list(range(len(body["prompt"]) * n))
    assert pd == colocated
    assert all(len(c["token_ids"]) == 6 for c in pd["choices"].values())
    # Each prompt's choices come from that prompt: different prompts give different greedy texts.
    if n == 1:
        assert len({c["text"] for c in pd["choices"].values()}) == len(body["prompt"])


def test_pd_prompt_list_refusal_names_the_field(deployments: dict[str, Serve]) -> None:
    response = httpx.post(deployments["pd"].url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": PROMPTS, "max_tokens": 4, "n": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n", response.text
    response = httpx.post(deployments["pd"].url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": ["a"] * 65, "max_tokens": 4, "n": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n", response.text  # as colocated


def test_pd_prompt_list_stream_without_usage_chunk_carries_no_usage(deployments: dict[str, Serve]) -> None:
    """Without stream_options.include_usage a streamed list of prompts carries no usage, as a colocated instance
    streams it: each prompt's leg puts its own counts on its last chunk (one choice per leg), and those were
    relayed, so a client reading the stream's last usage took one prompt's counts for the request's."""
    body = {"prompt": PROMPTS, "temperature": 0.0, "stream": True}
    pd, colocated = _ask(deployments["pd"], body), _ask(deployments["colocated"], body)
    assert pd == colocated and pd["usage"] is None


@pytest.mark.parametrize(("fields", "param"), [({"n": 50}, "n"), ({"best_of": 50}, "best_of"),
                                               ({"prompt": ["Hi"] * 129}, "prompt")])
def test_too_many_choices_name_the_field_that_multiplies_them(deployments: dict[str, Serve], fields: dict[str, Any],
                                                              param: str) -> None:
    """3 prompts x 50 samples: the same 400 through PD as colocated, naming n (or best_of) and the fix (before, PD
    named `prompt` and neither said what to do). 129 prompts of one sample each name the prompts (they read
    "129 prompts x 1 samples (n) ...; lower n", which cannot go below 1)."""
    for serve in deployments.values():
        response = httpx.post(serve.url + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": PROMPTS, "max_tokens": 4, **fields})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        fix = "send the prompts in several requests" if param == "prompt" else \
            f"lower {param} or send the prompts in several requests"
        assert error["param"] == param and fix in error["message"], error
        assert param != "prompt" or "lower" not in error["message"], error
