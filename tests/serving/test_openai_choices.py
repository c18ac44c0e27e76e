"""n > 1, best_of, a list of prompts and echo on a real instance (tiny model, CPU): choices indexed
as OpenAI does, seeded samples reproducible and distinct, later samples reuse the first one's
prompt blocks (prefix cache), streaming gives what the whole response gives."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.http.sse import parse_sse
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import in_process_instance

PROMPT = "The capital of France is a city that has many old buildings and"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, EngineLoop]]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny"}, "cache": {"num_gpu_blocks": 256, "block_size": 8},
        "scheduler": {"max_num_seqs": 16}, "security": {"deployment_secret": "test-deployment-secret-0123456789"},
    })
    with in_process_instance(cfg, "choices-0", max_pending_requests=64) as (url, loop):
        yield url, loop


def post(url: str, path: str = "/v1/completions", **body: Any) -> httpx.Response:
    body.setdefault("max_tokens", 8)
    if path.endswith("/completions") and "messages" not in body:
        body.setdefault("prompt", PROMPT)
    return httpx.post(f"{url}{path}", json={"model": "tiny", "ignore_eos": True, **body}, timeout=120)


def texts(answer: httpx.Response) -> list[str]:
    assert answer.status_code == 200, answer.text
    choices = answer.json()["choices"]
    assert [c["index"] for c in choices] == list(range(len(choices)))
    return [c["text"] if "text" in c else c["message"]["content"] for c in choices]


def test_seeded_samples_are_distinct_and_reproducible(server: tuple[str, EngineLoop]) -> None:
    url, loop = server
    cached_before = loop.engine.stats()["prompt_tokens_cached"]
    first = texts(post(url, n=4, temperature=1.0, seed=5))
    assert len(first) == 4 and len(set(first)) > 1
    assert texts(post(url, n=4, temperature=1.0, seed=5)) == first
    # Sample i uses seed + i: sample 1 of seed 5 is sample 0 of seed 6.
    assert texts(post(url, n=1, temperature=1.0, seed=6))[0] == first[1]
    # Every later sample found the first one's full prompt blocks in the prefix cache.
    assert loop.engine.stats()["prompt_tokens_cached"] - cached_before >= 3 * 8
    usage = post(url, n=3, temperature=0.0).json()["usage"]
    single = post(url, temperature=0.0).json()["usage"]
    assert usage["prompt_tokens"] == single["prompt_tokens"] and usage["completion_tokens"] == 3 * 8


def test_a_list_of_prompts_is_answered_as_a_batch(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    prompts = ["Once upon a time", "The weather today"]
    batch = texts(post(url, prompt=prompts, n=2, temperature=0.0))
    alone = [texts(post(url, prompt=p, temperature=0.0))[0] for p in prompts]
    assert batch == [alone[0], alone[0], alone[1], alone[1]]  # index = prompt * n + sample
    ids = texts(post(url, prompt=[[5, 6, 7], [8, 9]], temperature=0.0))
    assert len(ids) == 2


def test_best_of_returns_the_most_likely_samples(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    answer = post(url, n=2, best_of=5, temperature=1.0, seed=3)
    assert len(texts(answer)) == 2 and answer.json()["choices"][0]["logprobs"] is None
    scored = post(url, n=5, temperature=1.0, seed=3, logprobs=0).json()["choices"]
    totals = sorted(((sum(c["logprobs"]["token_logprobs"]), c["text"]) for c in scored), reverse=True)
    assert texts(answer) == [t for _, t in totals[:2]]
    assert usage_of(answer)["completion_tokens"] == 5 * 8


def usage_of(answer: httpx.Response) -> dict[str, Any]:
    return dict(answer.json()["usage"])


def test_echo_prefixes_the_prompt(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    plain = texts(post(url, temperature=0.0))[0]
    assert texts(post(url, temperature=0.0, echo=True)) == [PROMPT + plain]
    events = parse_sse(post(url, temperature=0.0, echo=True, stream=True).content)
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"]) == \
        PROMPT + plain


def test_streamed_choices_equal_the_whole_response(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    for path, extra in (("/v1/completions", {}), ("/v1/chat/completions",
                                                   {"messages": [{"role": "user", "content": "Hi"}]})):
        whole = texts(post(url, path, n=3, temperature=1.0, seed=9, **extra))
        events = parse_sse(post(url, path, n=3, temperature=1.0, seed=9, stream=True,
                                stream_options={"include_usage": True}, **extra).content)
        chunks = [json.loads(e) for e in events[:-1]]
        streamed = ["", "", ""]
        for chunk in chunks:
            for c in chunk["choices"]:
                streamed[c["index"]] += c.get("text") or c.get("delta", {}).get("content") or ""
        assert streamed == whole
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 0}, "n"), ({"n": 3, "best_of": 2}, "best_of"), ({"best_of": 3, "stream": True}, "best_of"),
    ({"echo": True, "logprobs": 1, "stream": True}, "echo"), ({"n": 129}, "n"),
])
def test_bad_choice_requests_are_a_400_naming_the_field(server: tuple[str, EngineLoop], body: dict[str, Any],
                                                         param: str) -> None:
    url, _ = server
    answer = post(url, **body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


def test_chat_refuses_best_of_and_echo(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    for field, value in (("best_of", 2), ("echo", True)):
        answer = post(url, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], **{field: value})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field
