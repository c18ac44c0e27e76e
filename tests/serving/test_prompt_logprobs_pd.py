"""prompt_logprobs through the PD proxy (`pdlaunch serve --model tiny`, CPU): the prefill computes them,
the proxy puts them into the decode's answer (every choice of a completion, the top level of a chat),
equal to what a colocated deployment answers, for one prompt, n > 1 and a list of prompts. echo with
logprobs is refused in PD with a 400 naming echo (the decode never computes the prompt)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.serving.e2e import Serve

pytestmark = pytest.mark.e2e

PROMPT = "Prompt logprobs come from the prefill instance, which computes every position of"


@pytest.fixture
def deployments(pd_and_colocated_deployments: dict[str, Serve]) -> dict[str, Serve]:
    return pd_and_colocated_deployments  # tests/serving/conftest.py: one pair for every module that compares them


def _ask(serve: Serve, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(serve.url + path, timeout=180, json={"model": "tiny", "max_tokens": 4, "ignore_eos": True,
                                                           "temperature": 0.0, **body})


def _prompt_logprobs(answer: dict[str, Any], chat: bool) -> list[Any]:
    if chat:
        return [answer["prompt_logprobs"]]
    return [c["prompt_logprobs"] for c in answer["choices"]]


def _close(a: Any, b: Any) -> None:
    assert (a is None) == (b is None)
    if a is None:
        return
    assert a.keys() == b.keys()
    for token in a:
        assert a[token]["rank"] == b[token]["rank"] and a[token]["decoded_token"] == b[token]["decoded_token"]
        assert a[token]["logprob"] == pytest.approx(b[token]["logprob"], abs=1e-4)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 2}),
    ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 0, "n": 2, "temperature": 1.0, "seed": 3}),
    ("/v1/completions", {"prompt": [PROMPT, "A second prompt"], "prompt_logprobs": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "prompt_logprobs": 3}),
], ids=["completion", "n2", "prompt-list", "chat"])
def test_pd_prompt_logprobs_equal_colocated(deployments: dict[str, Serve], path: str, body: dict[str, Any]) -> None:
    chat = path.endswith("chat/completions")
    pd, colocated = _ask(deployments["pd"], path, body), _ask(deployments["colocated"], path, body)
    assert pd.status_code == 200 and colocated.status_code == 200, (pd.text, colocated.text)
    ours, theirs = _prompt_logprobs(pd.json(), chat), _prompt_logprobs(colocated.json(), chat)
    assert len(ours) == len(theirs) >= 1
    for a, b in zip(ours, theirs):
        assert a[0] is None and len(a) == len(b) > 1
        for x, y in zip(a, b):
            _close(x, y)
    if not chat:
        assert [c["text"] for c in pd.json()["choices"]] == [c["text"] for c in colocated.json()["choices"]]


def test_pd_refuses_echo_with_logprobs(deployments: dict[str, Serve]) -> None:
    answer = _ask(deployments["pd"], "/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 1})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "echo", answer.text
    assert _ask(deployments["colocated"], "/v1/completions",
                {"prompt": PROMPT, "echo": True, "logprobs": 1}).status_code == 200
