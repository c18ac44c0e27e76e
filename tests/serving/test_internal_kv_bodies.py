"""A malformed body to an instance's internal KV routes (`POST /internal/kv/release`, `/internal/kv/forget_engine`)
is a 400 in our words: the field as the caller sent it, what was wrong with it and what to send. Pydantic's own
words came back ("engine_id: Field required", "request_id: Input should be a valid string", "junk: Extra inputs
are not permitted", "String should have at least 1 character"). Tiny model on CPU, one instance in process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.http.auth import internal_headers
from pdlaunch.server.internal import KV_FORGET_ENGINE_PATH, KV_RELEASE_PATH
from tests.serving.helpers import in_process_instance, tiny_colocated

CFG = tiny_colocated(256)
HEADERS = internal_headers(CFG.security.deployment_secret)
TIMEOUT = 120.0  # a loaded 2-core machine
# What pydantic says, which a caller of ours should never read.
PYDANTIC_WORDS = ("Field required", "Input should", "Extra inputs", "String should", "value_error", "Value error",
                  "type=", "loc", "pydantic", "model_", "KVReleaseRequest", "KVForgetEngineRequest")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(CFG, "test-internal-kv-bodies-0") as (served, _):
        yield served


def refused(url: str, path: str, body: Any) -> dict[str, Any]:
    answer = httpx.post(f"{url}{path}", json=body, headers=HEADERS, timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    error: dict[str, Any] = answer.json()["error"]
    assert not [w for w in PYDANTIC_WORDS if w in error["message"]], error
    return error


# (path, body, the field named, words the message must carry: what was wrong, what to send)
CASES = [
    (KV_FORGET_ENGINE_PATH, {}, "engine_id", ("engine_id is missing", "send", "engine id")),
    (KV_FORGET_ENGINE_PATH, {"engine_id": 5}, "engine_id", ("engine_id must be", "engine id", "got an integer")),
    (KV_FORGET_ENGINE_PATH, {"engine_id": None}, "engine_id", ("engine_id must be", "got null")),
    (KV_FORGET_ENGINE_PATH, {"engine_id": ""}, "engine_id", ("engine_id must be", "1 to 512 characters",
                                                            "got an empty string")),
    (KV_FORGET_ENGINE_PATH, {"engine_id": "x" * 600}, "engine_id", ("engine_id must be", "got a string of 600 "
                                                                                         "characters")),
    (KV_FORGET_ENGINE_PATH, {"engine_id": "D0", "junk": 1}, "junk",
     (f"junk is not a field of POST {KV_FORGET_ENGINE_PATH}", "engine_id")),
    (KV_RELEASE_PATH, {}, "body", ("exactly one of request_id and client_request_id", "got neither")),
    (KV_RELEASE_PATH, {"request_id": "a", "client_request_id": "b"}, "body",
     ("exactly one of request_id and client_request_id", "got both")),
    (KV_RELEASE_PATH, {"request_id": 5}, "request_id", ("request_id must be", "remote_request_id",
                                                        "got an integer")),
    (KV_RELEASE_PATH, {"client_request_id": ["a"]}, "client_request_id",
     ("client_request_id must be", "X-Request-Id", "got a list of strings")),
    (KV_RELEASE_PATH, {"request_id": ""}, "request_id", ("request_id must be", "got an empty string")),
    (KV_RELEASE_PATH, {"request_id": "a", "junk": 1}, "junk",
     (f"junk is not a field of POST {KV_RELEASE_PATH}", "request_id", "client_request_id")),
]


@pytest.mark.parametrize(("path", "body", "param", "words"), CASES,
                         ids=[f"{p.rsplit('/', 1)[-1]}-{b}"[:60] for p, b, *_ in CASES])
def test_a_malformed_internal_body_is_a_400_in_our_words(url: str, path: str, body: Any, param: str,
                                                         words: tuple[str, ...]) -> None:
    error = refused(url, path, body)
    assert error["param"] == param, error
    assert all(w in error["message"] for w in words), error


def test_several_problems_name_the_first_and_count_the_rest(url: str) -> None:
    error = refused(url, KV_FORGET_ENGINE_PATH, {"engine_id": 5, "junk": 1, "more": 2})
    assert error["param"] == "engine_id" and error["message"].endswith("(and 2 more problem(s))"), error


def test_a_well_formed_body_is_still_served(url: str) -> None:
    answer = httpx.post(f"{url}{KV_RELEASE_PATH}", json={"request_id": "never-held"}, headers=HEADERS,
                        timeout=TIMEOUT)
    assert answer.status_code == 200 and answer.json() == {"request_id": "never-held", "released": False}, answer.text
    answer = httpx.post(f"{url}{KV_FORGET_ENGINE_PATH}", json={"engine_id": "nobody"}, headers=HEADERS,
                        timeout=TIMEOUT)
    assert answer.status_code == 200 and answer.json() == {"engine_id": "nobody", "forgotten": 0}, answer.text
