"""`/tokenize`, `/detokenize`, `/version` (server/tokenize.py, proxy/routes.py) in vLLM's shapes, at a real
instance and through a proxy in front of it, behind the API key. Raw HTTP: the openai client has no
methods for these routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import pdlaunch
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.serving.helpers import ThreadServer, in_process_instance, wait_for

SECRET = "tokenize-test-secret-0123456789"
KEY = "sk-tokenize"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count my tokens, please."}]


@pytest.fixture(scope="module")
def urls() -> Iterator[dict[str, Any]]:
    """{"instance": URL, "proxy": URL, "tokenizer": the engine's}: one in-process instance and a proxy in front,
    both with the key."""
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": 512}, "cache": {"num_gpu_blocks": 64},
        "security": {"api_key": KEY, "deployment_secret": SECRET},
    })
    with in_process_instance(cfg, "tokenize-0", max_pending_requests=8) as (url, loop):
        pool = InstancePool([Instance(role="colocated", url=url, name="colocated-0")])
        app = build_proxy_app(pool, 60.0, api_key=KEY, deployment_secret=SECRET)
        with ThreadServer(app, PortAllocator("127.0.0.1").free("test proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see the instance")
            yield {"instance": url, "proxy": proxy.url, "tokenizer": loop.engine.tokenizer}


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=60)


@pytest.mark.parametrize("where", ["instance", "proxy"])
def test_tokenize_a_prompt_and_detokenize_it_back(urls: dict[str, Any], where: str) -> None:
    url = urls[where]
    answer = post(url, "/tokenize", {"model": "tiny", "prompt": "Hello tokens"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == 512 and body["token_strs"] is None
    # The ids a completion with the same prompt sends to the engine: its usage counts them.
    completion = post(url, "/v1/completions", {"prompt": "Hello tokens", "max_tokens": 1, "temperature": 0}).json()
    assert completion["usage"]["prompt_tokens"] == body["count"]
    plain = post(url, "/tokenize", {"prompt": "Hello tokens", "add_special_tokens": False,
                                    "return_token_strs": True}).json()
    tokenizer = urls["tokenizer"]
    assert body["tokens"] == tokenizer.encode("Hello tokens")
    assert plain["tokens"] == tokenizer.encode("Hello tokens", add_special_tokens=False)
    assert plain["token_strs"] == [tokenizer.id_to_token(t) for t in plain["tokens"]]
    back = post(url, "/detokenize", {"model": "tiny", "tokens": plain["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "Hello tokens"}


@pytest.mark.parametrize("where", ["instance", "proxy"])
def test_tokenize_messages_counts_what_a_chat_request_sends(urls: dict[str, Any], where: str) -> None:
    url = urls[where]
    body = post(url, "/tokenize", {"messages": MESSAGES}).json()
    chat = post(url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "temperature": 0}).json()
    assert body["count"] == chat["usage"]["prompt_tokens"] == len(body["tokens"])
    without_header = post(url, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert without_header["count"] < body["count"]
    assert body["tokens"][:without_header["count"]] == without_header["tokens"]


@pytest.mark.parametrize("where", ["instance", "proxy"])
def test_bad_bodies_are_refused_naming_the_field(urls: dict[str, Any], where: str) -> None:
    url = urls[where]
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/tokenize", {"prompt": "x", "add_special_token": True}, 400, "add_special_token"),  # misspelt
        ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, "prompt"),
        ("/tokenize", {"messages": MESSAGES, "add_generation_prompt": True, "continue_final_message": True}, 400,
         "continue_final_message"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"messages": MESSAGES, "chat_template": "{{ 1 }}"}, 400, "chat_template"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
        ("/detokenize", {"tokens": [1, -1]}, 400, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": "12"}, 400, "tokens"),
        ("/detokenize", {"tokens": [1], "skip_special_tokens": True}, 400, "skip_special_tokens"),
    ]
    for path, body, status, param in cases:
        answer = post(url, path, body)
        assert answer.status_code == status, (path, body, answer.text)
        assert answer.json()["error"]["param"] == param, (path, body, answer.text)


@pytest.mark.parametrize("where", ["instance", "proxy"])
def test_version_and_the_api_key(urls: dict[str, Any], where: str) -> None:
    url = urls[where]
    assert httpx.get(f"{url}/version", headers=AUTH).json() == {"version": pdlaunch.__version__}
    for method, path in (("GET", "/version"), ("POST", "/tokenize"), ("POST", "/detokenize")):
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
            refused = httpx.request(method, f"{url}{path}", json={"prompt": "x", "tokens": [1]}, headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
