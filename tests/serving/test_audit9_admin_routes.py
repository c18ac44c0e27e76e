"""Answers of an instance's routes to a request no route takes (real HTTP, the tiny random model on CPU, one
colocated instance): each names what was sent and what to send.

- A wrong method (`POST /health`, `GET /sleep`) read only "Method Not Allowed": not which methods the route takes.
- A path no route has (`POST /reset_prefix_cache`, vLLM's) read only "Not Found": not which path.
- An empty body (`curl -X POST URL` without -d) read "request body is not valid JSON: Expecting value: line 1
  column 1 (char 0)", and a JSON array or string "request body must be a JSON object", without what was sent.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from pdlaunch.http.auth import internal_headers
from tests.serving.helpers import tiny_instance

TIMEOUT = 120.0  # a loaded 2-core machine
# The deployment's own token (tiny_instance's secret): past the access check of /sleep and /internal/..., to their
# routing (the check answers 403 first to anybody else, whatever the method or path).
INTERNAL = internal_headers("audit9-routes-secret-0123456789")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with tiny_instance("audit9-routes") as instance_url:
        yield instance_url


@pytest.mark.parametrize(("method", "path", "takes"), [
    ("POST", "/health", "GET or HEAD"), ("GET", "/sleep", "POST"), ("DELETE", "/v1/models", "GET or HEAD"),
    ("GET", "/v1/completions", "POST"), ("PUT", "/internal/kv/release", "POST")])
def test_a_wrong_method_names_the_methods_the_route_takes(url: str, method: str, path: str, takes: str) -> None:
    answer = httpx.request(method, f"{url}{path}", headers=INTERNAL, timeout=TIMEOUT)
    assert answer.status_code == 405, answer.text
    assert set(answer.headers["allow"].split(", ")) == set(takes.split(" or ")), answer.headers  # RFC 9110
    error = answer.json()["error"]
    assert error["message"] == f"{method} {path}: {path} takes {takes}, not {method}", error
    assert error["type"] == "invalid_request_error", error


@pytest.mark.parametrize(("method", "path"), [("POST", "/reset_prefix_cache"), ("GET", "/v1/model"),
                                              ("POST", "/internal/kv/nothing")])
def test_a_path_no_route_has_is_named(url: str, method: str, path: str) -> None:
    answer = httpx.request(method, f"{url}{path}", headers=INTERNAL, timeout=TIMEOUT)
    assert answer.status_code == 404, answer.text
    error = answer.json()["error"]
    assert error["type"] == "not_found_error", error
    assert error["message"].startswith(f"{method} {path}: no such route on this server"), error
    listed = error["message"].partition("it has ")[2]  # the routes a client may call
    assert "/v1/completions" in listed and "/internal/" not in listed, error


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize", "/internal/kv/release"])
def test_an_empty_body_is_called_empty(url: str, path: str) -> None:
    answer = httpx.post(f"{url}{path}", headers=INTERNAL, timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "body", error
    assert error["message"] == "request body is empty: send a JSON object (Content-Type: application/json)", error


@pytest.mark.parametrize(("body", "got"), [("[]", "an empty list"), ('"hi"', "a string"), ("5", "an integer"),
                                           ("null", "null"), ("true", "a boolean")])
def test_a_body_that_is_no_object_says_what_it_is(url: str, body: str, got: str) -> None:
    answer = httpx.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"},
                        timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "body", error
    assert error["message"] == f"request body must be a JSON object, got {got}", error
