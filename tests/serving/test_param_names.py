"""A 400 names the parameter the client sent, with what it may be: `level` of POST /sleep?level=abc (not pydantic's
`query.level`), and a chat request's `max_tokens` when it is invalid beside a valid `max_completion_tokens` (before,
accepted and dropped unread, as vLLM drops it). Tiny model on CPU, one instance in process, sleep mode on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.exceptions import RequestValidationError

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.http.auth import internal_headers
from pdlaunch.http.errors import validation_error
from tests.serving.helpers import in_process_instance, tiny_colocated

SECRET = tiny_colocated(256).security.deployment_secret
TIMEOUT = 120.0  # a loaded 2-core machine
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    cfg = tiny_colocated(256)
    cfg = DeploymentConfig.model_validate({**cfg.model_dump(), "model": {**cfg.model.model_dump(),
                                                                         "enable_sleep_mode": True}})
    with in_process_instance(cfg, "test-param-names-0") as (served, _):
        yield served


def error_of(answer: httpx.Response) -> dict[str, Any]:
    assert answer.status_code == 400, answer.text
    error: dict[str, Any] = answer.json()["error"]
    return error


@pytest.mark.parametrize("level", ["abc", "3", "1.5", ""])
def test_a_bad_sleep_level_names_level_and_both_levels(url: str, level: str) -> None:
    answer = httpx.post(f"{url}/sleep", params={"level": level}, headers=internal_headers(SECRET), timeout=TIMEOUT)
    error = error_of(answer)
    assert error["param"] == "level", error
    assert error["message"] == ("level must be 1 (keep weights in host memory) or 2 (discard all), "
                                f"got {level!r}"), error
    assert "query" not in answer.text, error


def test_unknown_wake_up_tags_name_tags(url: str) -> None:
    answer = httpx.post(f"{url}/wake_up", params={"tags": "weights,optimizer"}, headers=internal_headers(SECRET),
                        timeout=TIMEOUT)
    error = error_of(answer)
    assert error["param"] == "tags" and "use weights and/or kv_cache" in error["message"], error


def test_a_query_parameter_fastapi_refuses_is_named_without_its_source() -> None:
    """What FastAPI's own validation of a typed query parameter says (`loc` begins with where it was found)."""
    exc = RequestValidationError([{"type": "int_parsing", "loc": ("query", "level"), "input": "abc",
                                   "msg": "Input should be a valid integer, unable to parse string as an integer"}])
    error = validation_error(exc)
    assert error.param == "level" and error.message.startswith("level: Input should be a valid integer"), error


def chat(url: str, **fields: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT,
                      json={"model": "tiny", "messages": HI, "temperature": 0.0, "ignore_eos": True, **fields})


@pytest.mark.parametrize("max_tokens", [-1, 0, 2**31])
def test_an_invalid_max_tokens_beside_max_completion_tokens_is_refused(url: str, max_tokens: int) -> None:
    error = error_of(chat(url, max_tokens=max_tokens, max_completion_tokens=2))
    assert error["param"] == "max_tokens", error
    assert error["message"].startswith("max_tokens: Input should be "), error
    assert "max_completion_tokens, sent as well, sets the limit" in error["message"], error


def test_a_valid_max_tokens_beside_max_completion_tokens_leaves_the_limit_to_it(url: str) -> None:
    answer = chat(url, max_tokens=9, max_completion_tokens=2)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 2, answer.text


def test_an_invalid_max_completion_tokens_is_named_as_before(url: str) -> None:
    error = error_of(chat(url, max_tokens=4, max_completion_tokens=-1))
    assert error["param"] == "max_completion_tokens", error
