"""One client's large /tokenize, /detokenize or chat body is validated, and its chat prompt built and sized, off the
instance's event loop: a 6.8 MB /tokenize body of 200,000 messages (well under security.max_request_bytes) was
validated and templated there and held /health for 3.2 s, past the proxy's health timeout (the instance was marked
stalled and its streams migrated). A small body is still handled on the loop (a worker thread's hand-over costs it
more than its work). A chat's messages are capped (MAX_CHAT_MESSAGES), at the instance and through the proxy, which
bounds /tokenize's body as it bounds every route's. A real instance (tiny model, CPU, in this process)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.config.launcher_config import SecurityConfig
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.server import chat_template, tokenize
from pdlaunch.server.chat_request import MAX_CHAT_MESSAGES, ChatCompletionRequest
from pdlaunch.server.tokenize import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from tests.serving.helpers import ThreadServer, in_process_instance, on_event_loop, tiny_colocated, wait_for

TIMEOUT = 120.0  # a loaded 2-core machine
LARGE_CHAT = [{"role": "user", "content": "a"}] * 20_000  # ~620 KB of JSON: past PARSE_INLINE_BYTES


@pytest.fixture(scope="module")
def urls() -> Iterator[dict[str, str]]:
    """{"instance": URL, "proxy": URL}: one in-process instance and a proxy in front, the default body limit."""
    cfg = tiny_colocated(256)
    with in_process_instance(cfg, "tokenize-event-loop-0") as (url, _):
        pool = InstancePool([Instance(role="colocated", url=url, name="colocated-0")])
        app = build_proxy_app(pool, 60.0, deployment_secret=cfg.security.deployment_secret)
        with ThreadServer(app, PortAllocator("127.0.0.1").free("test proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see the instance")
            yield {"instance": url, "proxy": proxy.url}


class Where:
    """Whether each recorded call ran on the event loop, by name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.seen: dict[str, list[bool]] = {}

    def method(self, owner: type, name: str) -> None:
        original = getattr(owner, name)
        seen = self.seen.setdefault(f"{owner.__name__}.{name}", [])

        def recording(this: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append(on_event_loop())
            return original(this, *args, **kwargs)

        self.monkeypatch.setattr(owner, name, recording)

    def classmethod(self, owner: type, name: str) -> None:
        original = getattr(owner, name).__func__
        seen = self.seen.setdefault(f"{owner.__name__}.{name}", [])

        def recording(cls: type, *args: Any, **kwargs: Any) -> Any:
            seen.append(on_event_loop())
            return original(cls, *args, **kwargs)

        self.monkeypatch.setattr(owner, name, classmethod(recording))

    def function(self, module: Any, name: str) -> None:
        original: Callable[..., Any] = getattr(module, name)
        seen = self.seen.setdefault(f"{module.__name__}.{name}", [])

        def recording(*args: Any, **kwargs: Any) -> Any:
            seen.append(on_event_loop())
            return original(*args, **kwargs)

        self.monkeypatch.setattr(module, name, recording)


@pytest.fixture()
def where(monkeypatch: pytest.MonkeyPatch) -> Where:
    return Where(monkeypatch)


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=json.dumps(body), headers={"Content-Type": "application/json"},
                      timeout=TIMEOUT)


def _assert_400(answer: httpx.Response, param: str, *words: str) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param, answer.text
    assert all(word in error["message"] for word in words), answer.text


def test_a_large_tokenize_chat_is_validated_templated_and_sized_off_the_event_loop(urls: dict[str, str],
                                                                                   where: Where) -> None:
    where.classmethod(TokenizeChatRequest, "model_validate")
    where.method(TokenizeChatRequest, "chat_prompt")
    where.function(tokenize, "check_prompt_size")
    answer = _post(urls["instance"], "/tokenize", {"messages": LARGE_CHAT})
    _assert_400(answer, "messages", "20000 message(s)", "cannot fit in max_model_len 256")
    assert where.seen == {"TokenizeChatRequest.model_validate": [False], "TokenizeChatRequest.chat_prompt": [False],
                          "pdlaunch.server.tokenize.check_prompt_size": [False]}


def test_a_large_tokenize_prompt_and_detokenize_are_validated_off_the_event_loop(urls: dict[str, str],
                                                                                 where: Where) -> None:
    where.classmethod(TokenizeCompletionRequest, "model_validate")
    where.classmethod(DetokenizeRequest, "model_validate")
    where.function(tokenize, "check_prompt_size")
    _assert_400(_post(urls["instance"], "/tokenize", {"prompt": "a" * 100_000}), "prompt", "100000 characters")
    _assert_400(_post(urls["instance"], "/detokenize", {"tokens": [1] * 200_000 + [-1]}), "tokens", "tokens[200000]")
    assert where.seen == {"TokenizeCompletionRequest.model_validate": [False],
                          "DetokenizeRequest.model_validate": [False],
                          "pdlaunch.server.tokenize.check_prompt_size": [False]}


def test_a_large_chat_completion_is_templated_and_counted_off_the_event_loop(urls: dict[str, str],
                                                                            where: Where) -> None:
    where.method(ChatCompletionRequest, "template_messages")
    where.function(chat_template, "template_chars")
    answer = _post(urls["instance"], "/v1/chat/completions", {"messages": LARGE_CHAT, "max_tokens": 1})
    _assert_400(answer, "messages", "20000 message(s)", "cannot fit in max_model_len 256")
    assert where.seen == {"ChatCompletionRequest.template_messages": [False],
                          "pdlaunch.server.chat_template.template_chars": [False]}


def test_small_bodies_are_still_handled_on_the_event_loop(urls: dict[str, str], where: Where) -> None:
    """Their answers as before; a worker thread's hand-over would cost each more than its work."""
    where.classmethod(TokenizeChatRequest, "model_validate")
    where.classmethod(DetokenizeRequest, "model_validate")
    where.method(TokenizeChatRequest, "chat_prompt")
    where.method(ChatCompletionRequest, "template_messages")
    where.function(chat_template, "template_chars")
    messages = [{"role": "user", "content": "hi"}]
    counted = _post(urls["instance"], "/tokenize", {"messages": messages, "return_token_strs": True})
    assert counted.status_code == 200, counted.text
    body = counted.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"} and body["count"] == len(body["tokens"])
    assert len(body["token_strs"]) == body["count"] and body["max_model_len"] == 256
    assert _post(urls["instance"], "/detokenize", {"tokens": body["tokens"]}).status_code == 200
    chat = _post(urls["instance"], "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == body["count"], chat.text
    assert where.seen == {"TokenizeChatRequest.model_validate": [True], "DetokenizeRequest.model_validate": [True],
                          "TokenizeChatRequest.chat_prompt": [True], "ChatCompletionRequest.template_messages": [True],
                          "pdlaunch.server.chat_template.template_chars": [True, True]}


@pytest.mark.parametrize(("owner", "name", "path"), [
    (TokenizeChatRequest, "chat_prompt", "/tokenize"),
    (ChatCompletionRequest, "template_messages", "/v1/chat/completions"),
])
def test_health_answers_while_a_large_chat_is_templated(urls: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                                        owner: type, name: str, path: str) -> None:
    """The templating is held until /health has answered: on the event loop /health could not answer at all."""
    templating, health_answered = threading.Event(), threading.Event()
    original = getattr(owner, name)

    def held(self: Any) -> Any:
        templating.set()
        assert health_answered.wait(TIMEOUT), "/health did not answer while the chat was templated"
        return original(self)

    monkeypatch.setattr(owner, name, held)
    answer: list[httpx.Response] = []
    request = threading.Thread(target=lambda: answer.append(_post(urls["instance"], path, {"messages": LARGE_CHAT})),
                               daemon=True)
    request.start()
    try:
        assert templating.wait(TIMEOUT), "the request never reached its templating"
        assert httpx.get(f"{urls['instance']}/health", timeout=TIMEOUT).status_code == 200
    finally:
        health_answered.set()
        request.join(TIMEOUT)
    assert answer, "the request got no answer"
    _assert_400(answer[0], "messages", "cannot fit in max_model_len 256")


@pytest.mark.parametrize("where_to", ["instance", "proxy"])
@pytest.mark.parametrize("path", ["/tokenize", "/v1/chat/completions"])
def test_more_messages_than_the_cap_are_a_400_naming_messages(urls: dict[str, str], where_to: str,
                                                             path: str) -> None:
    over = _post(urls[where_to], path, {"messages": [{"role": "user", "content": "a"}] * (MAX_CHAT_MESSAGES + 1)})
    _assert_400(over, "messages", f"{MAX_CHAT_MESSAGES + 1} messages", f"at most {MAX_CHAT_MESSAGES}")
    at_cap = _post(urls[where_to], path, {"messages": [{"role": "user", "content": "a"}] * MAX_CHAT_MESSAGES})
    _assert_400(at_cap, "messages", f"{MAX_CHAT_MESSAGES} message(s)", "cannot fit in max_model_len 256")


@pytest.mark.parametrize("where_to", ["instance", "proxy"])
def test_a_tokenize_body_over_max_request_bytes_is_413(urls: dict[str, str], where_to: str) -> None:
    limit = SecurityConfig().max_request_bytes
    answer = _post(urls[where_to], "/tokenize", {"prompt": "a" * limit})
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large", answer.text
    assert "security.max_request_bytes" in answer.json()["error"]["message"]
