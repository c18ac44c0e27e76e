"""The proxy's HTTP edges against a real 1P1D deployment of the tiny model (`pdlaunch serve --api-key`):
methods a route does not take (405 naming the ones it does), HEAD, the client's X-Request-Id and API key,
and what a request that ends early leaves behind (no leg in flight at the proxy, no request running at the
instances, no traceback in the proxy's log)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import httpx
import pytest

from tests.serving.e2e import Serve
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

API_KEY = "sk-edge-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    deployment = Serve(tmp_path_factory.mktemp("proxy-edges"), [
        "--model", "tiny", "--prefill", "1", "--decode", "1", "--num-gpu-blocks", "256", "--block-size", "8",
        "--max-model-len", str(MAX_MODEL_LEN), "--api-key", API_KEY])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


def proxy_log(serve: Serve) -> str:
    return (serve.log_dir / "proxy.log").read_text(errors="replace")


def busy(serve: Serve) -> list[str]:
    """The series of /metrics that say a leg is in flight at the proxy or a request runs at an instance."""
    text = httpx.get(f"{serve.url}/metrics", headers=AUTH, timeout=30).text
    return [line for line in text.splitlines()
            if line.startswith(("pdlaunch_proxy_instance_in_flight", "pdlaunch_requests_running"))
            and float(line.rsplit(" ", 1)[1]) != 0]


def wait_idle(serve: Serve, what: str) -> None:
    try:
        wait_for(lambda: not busy(serve), what, timeout=60, poll=0.5)
    except AssertionError as exc:  # say which series stayed busy
        raise AssertionError(f"{exc}; still: {busy(serve)}") from None


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, dict) and error["message"] and error["type"], error
    return error


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("POST", "/health", "GET"), ("DELETE", "/instances", "GET"), ("PUT", "/metrics", "GET"),
    ("POST", "/v1/models", "GET"), ("GET", "/v1/completions", "POST"), ("GET", "/v1/chat/completions", "POST"),
    ("GET", "/tokenize", "POST"), ("GET", "/sleep", "POST"), ("POST", "/is_sleeping", "GET"),
])
def test_a_method_the_route_does_not_take_is_405_naming_those_it_does(
        serve: Serve, method: str, path: str, allowed: str) -> None:
    response = httpx.request(method, f"{serve.url}{path}", headers=AUTH, timeout=30)
    assert_openai_error(response, 405)
    assert allowed in {m.strip() for m in response.headers.get("allow", "").split(",")}, response.headers


@pytest.mark.parametrize("path", ["/health", "/instances", "/version", "/v1/models", "/metrics"])
def test_head_answers_as_get_without_a_body(serve: Serve, path: str) -> None:
    get = httpx.get(f"{serve.url}{path}", headers=AUTH, timeout=30)
    head = httpx.head(f"{serve.url}{path}", headers=AUTH, timeout=30)
    assert get.status_code == head.status_code == 200, head
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


def test_unknown_paths_are_404_in_openai_shape(serve: Serve) -> None:
    for path in ("/nope", "/v1/nope", "/v1/models/tiny"):
        assert assert_openai_error(httpx.get(f"{serve.url}{path}", headers=AUTH, timeout=30), 404)["code"] == 404
    assert httpx.head(f"{serve.url}/nope", headers=AUTH, timeout=30).status_code == 404


@pytest.mark.parametrize("authorization", [
    None, "Bearer", "Basic " + API_KEY, API_KEY, "Bearer " + API_KEY[:-1], "Bearer " + API_KEY + "0",
    "Bearer " + API_KEY.upper(), "Bearer\t" + API_KEY,
])
def test_anything_but_the_key_is_401(serve: Serve, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = httpx.get(f"{serve.url}/v1/models", headers=headers, timeout=30)
    assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    assert API_KEY not in response.text


@pytest.mark.parametrize("authorization", ["Bearer " + API_KEY, "bearer " + API_KEY, "Bearer  " + API_KEY])
def test_the_key_passes_with_any_case_of_scheme_and_spacing(serve: Serve, authorization: str) -> None:
    assert httpx.get(f"{serve.url}/v1/models", headers={"Authorization": authorization}, timeout=30).status_code == 200


@pytest.mark.parametrize("request_id", [b"a" * 257, b"caf\xc3\xa9", b"a\x7fb", b"a\tb", b"x" * 8000])
def test_a_request_id_that_is_not_short_printable_ascii_is_400_and_never_echoed(serve: Serve,
                                                                                request_id: bytes) -> None:
    headers = [(b"Authorization", AUTH["Authorization"].encode()), (b"X-Request-Id", request_id)]
    response = httpx.post(f"{serve.url}/v1/completions", headers=headers, json={"prompt": "hi", "max_tokens": 2},
                          timeout=60)
    assert assert_openai_error(response, 400)["param"] == "X-Request-Id"
    assert "x-request-id" not in response.headers
    assert request_id.decode("latin-1") not in proxy_log(serve)


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_list_takes_the_longest_request_id(serve: Serve, stream: bool) -> None:
    """Each prompt's legs carry the client's id with a suffix: cut to the instances' limit, never refused
    by them (before: a 256-character id, accepted alone, was a 400 'X-Request-Id must be at most 256 ...'
    with a list of prompts)."""
    request_id = "r" * 256
    response = httpx.post(f"{serve.url}/v1/completions", headers={**AUTH, "X-Request-Id": request_id}, timeout=60,
                          json={"prompt": ["hello", "there"], "max_tokens": 3, "stream": stream})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id
    assert f"cmpl-{request_id}" in response.text and '"error"' not in response.text


def test_a_prompt_list_with_a_refused_prompt_leaves_no_stream_open(serve: Serve) -> None:
    """One prompt of a streamed list refused by the decode (prompt + max_tokens > max_model_len) fails the
    request and cancels the other prompts: a decode leg cancelled while its stream was opening goes too
    (before: left running, it opened the stream and held its in-flight count forever, or failed with
    'Task exception was never retrieved' in the log)."""
    rng = random.Random(7)
    for _ in range(6):
        long = [rng.randrange(3, 500) for _ in range(MAX_MODEL_LEN - 20)]
        response = httpx.post(f"{serve.url}/v1/completions", headers=AUTH, timeout=60, json={
            "prompt": [long, [5, 6, 7], [8, 9]], "max_tokens": 40, "ignore_eos": True, "stream": True})
        assert assert_openai_error(response, 400)["param"] in ("prompt", "max_tokens"), response.text
    wait_idle(serve, "no leg in flight at the proxy and no request running at the instances")
    assert "never retrieved" not in proxy_log(serve) and "Traceback" not in proxy_log(serve)


def test_a_client_that_leaves_mid_stream_leaves_nothing_running(serve: Serve) -> None:
    for _ in range(3):
        with httpx.stream("POST", f"{serve.url}/v1/completions", headers=AUTH, timeout=60, json={
                "prompt": "a stream to leave", "max_tokens": 200, "ignore_eos": True, "stream": True}) as stream:
            assert stream.status_code == 200
            next(stream.iter_bytes())
    wait_idle(serve, "the departed streams to be aborted at the proxy and the decode")
    assert "Traceback" not in proxy_log(serve)
