"""A PD request the decode would refuse for its output limits is refused before the prefill computes its prompt: through
the real proxy in front of a prefill and a decode instance (tiny model, max_model_len 256, real NIXL on CPU, in this
process). The prefill leg asks for one token; the limits the decode applies (the client's max_tokens or
max_completion_tokens against max_model_len, 16 for a completion that names none, min_tokens against the room a
request without a limit has) travel with it (server/decode_limits.py), and the prefill answers the decode's 400, word
for word, without computing: its /info's prompt_tokens_computed does not move."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.serving.helpers import held_kv, prompt_from, wait_for
from tests.serving.tiny_instances import MODEL, TIMEOUT, TinyPD, tiny_pd

RELEASED_WITHIN_S = 20.0  # well within the deployment's 30 s lease: a release, not the lease, freed it

_first_ids = itertools.count(3, 7)  # each prompt starts with its own token: nothing of it is in a prefix cache


@pytest.fixture(scope="module")
def deployment() -> Iterator[TinyPD]:
    with tiny_pd("decode-limits") as pd:
        yield pd


def _computed(url: str) -> int:
    """The prompt tokens the instance at `url` computed since it started (its /info's stats)."""
    computed: int = httpx.get(f"{url}/info", timeout=TIMEOUT).json()["stats"]["prompt_tokens_computed"]
    return computed


def _holding(url: str) -> tuple[int, int]:
    return held_kv(url, TIMEOUT)


def _prompt(tokens: int) -> list[int]:
    return prompt_from(next(_first_ids), tokens)


def _message(words: int) -> list[dict[str, str]]:
    first = next(_first_ids)
    return [{"role": "user", "content": " ".join(f"w{first}x{i}" for i in range(words))}]


# (endpoint, body without its prompt, the prompt's length in tokens or the message's in words)
REFUSED: dict[str, tuple[str, dict[str, Any], int]] = {
    "max_tokens": ("completions", {"max_tokens": 250}, 10),
    "default max_tokens (16)": ("completions", {}, 245),
    "max_completion_tokens": ("chat/completions", {"max_completion_tokens": 250}, 4),
    "chat max_tokens": ("chat/completions", {"max_tokens": 250}, 4),
    "min_tokens without a limit": ("chat/completions", {"min_tokens": 300}, 4),
    # echo's prompt alone: the engine samples one token, which its refusal counts (not the 0 the client sent)
    "echo's max_tokens 0": ("completions", {"echo": True, "max_tokens": 0}, 256),
    "streamed": ("completions", {"max_tokens": 250, "stream": True}, 10),
}


def _body(endpoint: str, extra: dict[str, Any], size: int) -> dict[str, Any]:
    prompt = {"prompt": _prompt(size)} if endpoint == "completions" else {"messages": _message(size)}
    return {"model": MODEL, "temperature": 0.0, **prompt, **extra}


@pytest.mark.parametrize("case", REFUSED)
def test_a_request_the_decode_refuses_costs_the_prefill_nothing(deployment: TinyPD, case: str) -> None:
    endpoint, extra, size = REFUSED[case]
    body = _body(endpoint, extra, size)
    alone = httpx.post(f"{deployment.decode}/v1/{endpoint}", json=body, timeout=TIMEOUT)
    assert alone.status_code == 400, alone.text  # the decode's own refusal, the answer the client is to get
    before, held = _computed(deployment.prefill), _holding(deployment.prefill)
    r = httpx.post(f"{deployment.proxy}/v1/{endpoint}", json=body, timeout=TIMEOUT)
    assert (r.status_code, r.json()) == (400, alone.json())
    assert _computed(deployment.prefill) == before, f"the prefill computed the prompt of a request refused: {r.text}"
    # nothing held nor kept for the refused request (an earlier test's hold may only have gone back since)
    assert all(now <= then for now, then in zip(_holding(deployment.prefill), held, strict=True))


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_a_request_within_the_limits_is_prefilled_and_answered(deployment: TinyPD, endpoint: str) -> None:
    """The same deployment serves a request at the limit: the prefill computes its prompt (the counter above moves
    when it does) and the decode answers."""
    body = _body(endpoint, {"max_tokens": 4}, 250 if endpoint == "completions" else 4)
    before = _computed(deployment.prefill)
    r = httpx.post(f"{deployment.proxy}/v1/{endpoint}", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert _computed(deployment.prefill) > before


def test_a_prompt_outside_the_vocabulary_gets_the_decode_s_own_refusal(deployment: TinyPD) -> None:
    """The decode's engine refuses the prompt's ids before its length with max_tokens: through PD, the same 400."""
    body = {"model": MODEL, "prompt": [*_prompt(9), 10**6], "max_tokens": 250}
    alone = httpx.post(f"{deployment.decode}/v1/completions", json=body, timeout=TIMEOUT)
    assert alone.status_code == 400 and "vocabulary" in alone.json()["error"]["message"], alone.text
    before = _computed(deployment.prefill)
    r = httpx.post(f"{deployment.proxy}/v1/completions", json=body, timeout=TIMEOUT)
    assert (r.status_code, r.json()) == (400, alone.json())
    assert _computed(deployment.prefill) == before


def test_a_refused_prompt_of_a_list_leaves_the_prefill_nothing_held(deployment: TinyPD) -> None:
    """The proxy splits a list of prompts into a request each: one the decode would refuse gets the decode's 400
    for the whole list, and what the prefill computed and held for the others goes back at once, not at the end of
    its lease (30 s here)."""
    body = {"model": MODEL, "temperature": 0.0, "prompt": [_prompt(10), _prompt(250)], "max_tokens": 20}
    alone = httpx.post(f"{deployment.decode}/v1/completions", json=body, timeout=TIMEOUT)
    assert alone.status_code == 400, alone.text
    r = httpx.post(f"{deployment.proxy}/v1/completions", json=body, timeout=TIMEOUT)
    assert (r.status_code, r.json()) == (400, alone.json())
    wait_for(lambda: _holding(deployment.prefill) == (0, 0), "the prefill to hold no KV for the list's other prompt",
             RELEASED_WITHIN_S)


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_decode_limits_apply_to_a_prefill_leg_only(deployment: TinyPD, endpoint: str) -> None:
    """A client's own `decode_limits` describe no leg of its request: sent to an instance, or through the proxy
    (before any leg, so the prefill computes nothing), they are refused with a 400 naming the field, never
    ignored."""
    body = {**_body(endpoint, {"max_tokens": 4}, 100 if endpoint == "completions" else 4),
            "decode_limits": {"max_tokens": 1000}}
    computed = _computed(deployment.prefill)
    for url in (deployment.decode, deployment.proxy):
        r = httpx.post(f"{url}/v1/{endpoint}", json=body, timeout=TIMEOUT)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "decode_limits" and "remove it" in r.json()["error"]["message"]
    assert _computed(deployment.prefill) == computed
    without = {k: v for k, v in body.items() if k != "decode_limits"}
    assert httpx.post(f"{deployment.proxy}/v1/{endpoint}", json=without, timeout=TIMEOUT).status_code == 200
