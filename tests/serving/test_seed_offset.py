"""seed_offset through the HTTP API and the proxy: a 400 naming it when negative, past max_model_len + the prompt
or without a seed or on a greedy request; with n > 1 sample i skips it of seed + i; and the continuation a migration
sends carries it (proxy/continuation.py). A real instance (tiny model, CPU); engine-level behaviour:
tests/engine/test_seed_offset.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.http.errors import OpenAIError
from pdlaunch.proxy.continuation import continuation_body
from pdlaunch.proxy.translate import parse_client_body
from tests.serving.helpers import in_process_instance, tiny_colocated

MAX_MODEL_LEN = 128
PROMPT = "A seeded sample goes on where it was cut"
SEEDED = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 7, "ignore_eos": True,
          "return_token_ids": True}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(tiny_colocated(MAX_MODEL_LEN), "seed-offset-0") as (address, _):
        yield address


def complete(url: str, **body: Any) -> dict[str, Any]:
    answer = httpx.post(f"{url}/v1/completions", json={**SEEDED, **body}, timeout=120)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


BAD = [({"seed_offset": -1}, "greater than or equal to 0"), ({"seed_offset": 2 * MAX_MODEL_LEN + 1}, "max_model_len"),
       ({"seed_offset": 2, "seed": None}, "seed_offset: seed_offset skips draws of a seed's stream: it needs a seed"),
       ({"seed_offset": 2.0}, "integer")]  # our validators' words, without pydantic's "Value error, " before them


@pytest.mark.parametrize(("fields", "says"), BAD)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_bad_seed_offset_is_a_400_naming_it(url: str, path: str, fields: dict[str, Any], says: str) -> None:
    body = {**(SEEDED if path == "/v1/completions" else {**CHAT, "temperature": 1.0, "seed": 7}), **fields}
    answer = httpx.post(f"{url}{path}", json={k: v for k, v in body.items() if v is not None}, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "seed_offset" and says in error["message"], error


@pytest.mark.parametrize(("fields", "says"), BAD[0:1] + BAD[2:3])  # a type error: the app's handler (a 400 too)
def test_the_proxy_refuses_a_bad_seed_offset_before_any_instance_works(fields: dict[str, Any], says: str) -> None:
    body = {k: v for k, v in {**SEEDED, **fields}.items() if v is not None}
    with pytest.raises(OpenAIError) as err:
        parse_client_body(json.dumps(body).encode(), chat=False)
    assert err.value.status == 400 and err.value.param == "seed_offset" and says in err.value.message


def test_a_seed_offset_of_0_needs_no_seed(url: str) -> None:
    assert complete(url, seed=None, seed_offset=0, temperature=0)["choices"][0]["token_ids"]


def test_a_continuation_with_seed_offset_gives_the_rest_of_the_seeded_answer(url: str) -> None:
    whole = complete(url)["choices"][0]
    ids, k = whole["token_ids"], 4
    rest = complete(url, prompt=whole["prompt_token_ids"] + ids[:k], max_tokens=10 - k, seed_offset=k)
    assert rest["choices"][0]["token_ids"] == ids[k:]


def test_seed_offset_on_a_greedy_request_is_a_400(url: str) -> None:
    """A greedy request draws nothing: the offset would be accepted and ignored."""
    answer = httpx.post(f"{url}/v1/completions", json={**SEEDED, "temperature": 0, "seed_offset": 5}, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "seed_offset", answer.text
    assert "a greedy request (temperature 0 or top_k 1) draws nothing" in answer.json()["error"]["message"]


def test_each_of_n_samples_skips_the_offset_of_its_own_seed(url: str) -> None:
    """Sample i uses seed + i (server/choices.py) after the same seed_offset draws."""
    samples = complete(url, n=2, seed_offset=3)["choices"]
    alone = [complete(url, seed=7 + i, seed_offset=3)["choices"][0]["token_ids"] for i in range(2)]
    assert [c["token_ids"] for c in sorted(samples, key=lambda c: c["index"])] == alone
    assert alone[0] != complete(url)["choices"][0]["token_ids"]  # the offset moved the draws


def test_a_migrations_continuation_carries_seed_offset() -> None:
    """Token k of a seeded request is draw seed_offset + k of its seed: the continuation skips the `generated`
    draws its prompt's output ids took, after the client's own offset."""
    seeded = {"prompt": "x", "max_tokens": 10, "temperature": 0.9, "seed": 11}
    assert continuation_body(seeded, chat=False, token_ids=[1, 2, 3, 9, 8], generated=2)["seed_offset"] == 2
    own = continuation_body({**seeded, "seed_offset": 5}, chat=True, token_ids=[1, 2, 9], generated=1)
    assert (own["seed"], own["seed_offset"], own["max_tokens"]) == (11, 6, 9)
    assert "seed_offset" not in continuation_body({"prompt": "x", "temperature": 0.9}, chat=False, token_ids=[1, 9],
                                                  generated=1)
    # vLLM's "no seed": the instance draws from its shared generator, so there is no stream to skip along
    assert "seed_offset" not in continuation_body({**seeded, "seed": -1}, chat=False, token_ids=[1, 9], generated=1)
    for greedy in ({"temperature": 0}, {"temperature": 1e-6}, {"top_k": 1}):  # draws nothing: no offset to carry
        assert "seed_offset" not in continuation_body({**seeded, **greedy}, chat=False, token_ids=[1, 9], generated=1)
