"""Client mistakes at an instance (real HTTP, real engine on the tiny random model): every one is a 4xx
naming the field, never a 5xx, a stall or garbage (issue 14, item 4)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.errors import PdlaunchError
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.prompts import MAX_PROMPT_CHARS_PER_TOKEN
from tests.serving.helpers import in_process_instance

API_KEY = "sk-hardening-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 2048
MAX_REQUEST_BYTES = 12 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, EngineLoop]]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": MAX_MODEL_LEN}, "cache": {"num_gpu_blocks": 160},
        "scheduler": {"max_num_seqs": 8},
        "security": {"api_key": API_KEY, "deployment_secret": "hardening-secret-0123456789",
                     "max_request_bytes": MAX_REQUEST_BYTES},
    })
    with in_process_instance(cfg, "test-hardening-0", max_pending_requests=64) as (url, loop):
        yield url, loop


def post_raw(url: str, raw: str | bytes, path: str = "/v1/completions",
             headers_extra: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=raw, timeout=60,
                      headers={**AUTH, "Content-Type": "application/json", **(headers_extra or {})})


def assert_400(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize(("raw", "param"), [
    ('{"prompt": "x", "temperature": NaN}', "temperature"),
    ('{"prompt": "x", "temperature": Infinity}', "temperature"),
    ('{"prompt": "x", "top_p": -Infinity}', "top_p"),
    ('{"prompt": "x", "temperature": 1e999}', "temperature"),
    ('{"prompt": "x", "seed": 18446744073709551616}', "seed"),
    ('{"prompt": "x", "seed": -9223372036854775809}', "seed"),  # below int64, vLLM's lower bound
    ('{"prompt": "x", "max_tokens": 1099511627776}', "max_tokens"),
    ('{"prompt": "x", "top_k": 1000000000000000000000000000000}', "top_k"),
    ('{"prompt": "x", "logprobs": 100000000000000000000}', "logprobs"),
    ('{"prompt": "a\\ud800b"}', "prompt"),
    ('{"prompt": "x", "stop": ["ok", "a\\udfffb"]}', "stop.1"),
    ('{"prompt": "x", "kv_transfer_params": ' + "[" * 1000 + "]" * 1000 + "}", "body"),
    ('{"prompt": "x", "a": ' + "9" * 5000 + "}", "body"),
])
def test_bad_values_are_400_naming_the_field(server: tuple[str, EngineLoop], raw: str, param: str) -> None:
    url, _ = server
    assert_400(post_raw(url, raw), param)


def test_request_ids_and_stop_lists_are_bounded(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    assert_400(post_raw(url, '{"prompt": "x"}', headers_extra={"X-Request-Id": "r" * 300}), "X-Request-Id")
    assert_400(post_raw(url, json.dumps({"prompt": "x", "stop": ["s"] * 1000})), "stop")
    ok = post_raw(url, '{"prompt": "x", "max_tokens": 1}', headers_extra={"X-Request-Id": "r" * 256})
    assert ok.status_code == 200 and ok.json()["id"] == "cmpl-" + "r" * 256


def test_chat_fields_are_checked_too(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    raw = '{"messages": [{"role": "user", "content": "hi \\udc00"}], "max_tokens": 2}'
    assert_400(post_raw(url, raw, "/v1/chat/completions"), "messages.0.content")
    raw = '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    assert_400(post_raw(url, raw, "/v1/chat/completions"), "temperature")


def test_tiny_temperature_is_greedy_not_garbage(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    body = {"prompt": "The capital of France is", "max_tokens": 8, "ignore_eos": True, "return_token_ids": True}
    greedy = httpx.post(f"{url}/v1/completions", json={**body, "temperature": 0}, headers=AUTH, timeout=60).json()
    for tiny in (1e-40, 1e-30, 1e-6):
        answer = httpx.post(f"{url}/v1/completions", json={**body, "temperature": tiny}, headers=AUTH, timeout=60)
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["token_ids"] == greedy["choices"][0]["token_ids"]


def test_body_over_the_limit_is_413_before_parsing(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    big = b'{"prompt": "' + b"x" * (MAX_REQUEST_BYTES + 10) + b'"}'
    answer = post_raw(url, big)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts what arrives
        yield b'{"prompt": "'
        for _ in range(13):
            yield b"y" * (1 << 20)
        yield b'"}'

    answer = httpx.post(f"{url}/v1/completions", content=chunks(), headers=AUTH, timeout=60)
    assert answer.status_code == 413 and "max_request_bytes" in answer.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_huge_prompt_is_refused_before_tokenizing_and_never_stalls_others(server: tuple[str, EngineLoop]) -> None:
    url, loop = server
    bound = MAX_MODEL_LEN * MAX_PROMPT_CHARS_PER_TOKEN
    huge = {"prompt": "word " * ((10 << 20) // 5), "max_tokens": 4}  # 10 MB
    started = time.monotonic()
    answer = httpx.post(f"{url}/v1/completions", json=huge, headers=AUTH, timeout=60)
    assert_400(answer, "prompt")
    assert str(bound) in answer.json()["error"]["message"]
    assert time.monotonic() - started < 10, "a 10 MB prompt must be refused without tokenizing it"
    chat = {"messages": [{"role": "user", "content": "x" * (bound + 1)}], "max_tokens": 2}
    assert_400(httpx.post(f"{url}/v1/chat/completions", json=chat, headers=AUTH, timeout=60), "messages")

    # Prompts just under the bound are tokenized, in worker threads: never on the engine thread.
    threads: list[str] = []
    tokenizer = loop.engine.tokenizer
    encode = tokenizer.encode

    def recording_encode(text: str, *args: Any, **kwargs: Any) -> list[int]:
        threads.append(threading.current_thread().name)
        return encode(text, *args, **kwargs)

    tokenizer.encode = recording_encode
    try:
        async def main() -> tuple[list[int], float]:
            async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
                near = {"prompt": "lorem ipsum " * ((bound - 100) // 12), "max_tokens": 2}
                bigs = [asyncio.ensure_future(client.post(f"{url}/v1/completions", json=near)) for _ in range(4)]
                t0 = time.monotonic()
                small = await client.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
                small_s = time.monotonic() - t0
                assert small.status_code == 200
                return [r.status_code for r in await asyncio.gather(*bigs)], small_s

        statuses, small_s = asyncio.run(main())
    finally:
        tokenizer.encode = encode
    assert statuses == [400] * 4  # more tokens than max_model_len, found by tokenizing
    assert threads and "engine-loop" not in threads
    assert small_s < 15, f"a 3-token request took {small_s:.1f}s next to big prompts"


def test_json_errors_name_the_problem_in_openai_shape(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    for raw in ("not json", "[1, 2]", '{"prompt": 5}'):
        answer = post_raw(url, raw)
        assert answer.status_code == 400 and set(answer.json()["error"]) >= {"message", "type", "param", "code"}
    assert json.loads(post_raw(url, '{"prompt": "x", "max_tokens": 1}').text)["usage"]["completion_tokens"] == 1


def test_tokenizer_names_a_lone_surrogate_for_offline_callers(server: tuple[str, EngineLoop]) -> None:
    _, loop = server
    with pytest.raises(PdlaunchError) as err:
        loop.engine.tokenizer.encode("a\ud800b")
    assert err.value.field == "prompt" and "surrogate" in err.value.message


def test_millions_of_token_ids_are_refused_quickly(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    raw = '{"max_tokens": 2, "prompt": [' + ",".join(["123"] * 2_000_000) + "]}"  # 8 MB
    started = time.monotonic()
    answer = post_raw(url, raw)
    assert_400(answer, "prompt")
    assert "2000000 token ids" in answer.json()["error"]["message"]
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/metrics", "/info", "/version"])
def test_head_answers_as_get_without_a_body_on_an_instance_too(server: tuple[str, EngineLoop], path: str) -> None:
    """As the proxy does (it answered 200 where the instance answered 405: a load balancer probing an instance
    with HEAD saw it down)."""
    url, _ = server
    get = httpx.get(f"{url}{path}", headers=AUTH, timeout=30)
    head = httpx.head(f"{url}{path}", headers=AUTH, timeout=30)
    assert get.status_code == head.status_code == 200, (path, get.status_code, head.status_code)
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    assert httpx.head(f"{url}/v1/completions", headers=AUTH, timeout=30).status_code == 405  # a POST route


def test_a_negative_seed_is_a_seed_as_vllm_takes_it(server: tuple[str, EngineLoop]) -> None:
    """vLLM takes any int64 seed; torch's generator takes a negative one as its two's complement (seed + 2**64), so a
    negative seed is as reproducible as any, and n > 1 seeds each sample seed + i. `seed: -1` alone is vLLM's "no
    seed" (what clients send for a random draw): it gets no generator of its own, so it takes no seed_offset."""
    url, _ = server
    body = {"prompt": "hello", "max_tokens": 8, "temperature": 1.0, "ignore_eos": True, "n": 2}

    def texts(seed: int) -> list[str]:
        response = httpx.post(f"{url}/v1/completions", json={**body, "seed": seed}, headers=AUTH, timeout=60)
        assert response.status_code == 200, response.text
        return [c["text"] for c in sorted(response.json()["choices"], key=lambda c: c["index"])]

    first = texts(-3)
    assert texts(-3) == first
    assert texts(2**64 - 3) == first  # -3's two's complement: the same seed
    assert texts(-4)[1] == first[0]  # sample 1 of seed -4 draws from seed -3
    unseeded = httpx.post(f"{url}/v1/completions", json={**body, "seed": -1, "seed_offset": 2}, headers=AUTH,
                          timeout=60)
    assert unseeded.status_code == 400 and "it needs a seed" in unseeded.json()["error"]["message"], unseeded.text
