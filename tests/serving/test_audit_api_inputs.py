"""Client input an instance took without a word, or answered with a 500 (real HTTP, the tiny random model on CPU,
one instance for every probe): each is now a 400 naming the field, what was wrong and what to send.

- A chat's size bound counted the messages' text only: 3,000 empty messages (400,000 tokens once templated for
  100,000) or tool-call arguments of 70,000 characters were rendered and tokenized before any refusal.
- A chat template that fails on a request's values (Llama 3's `"Today Date: " + date_string` with a number, a
  chat_template_kwargs `namespace` hiding jinja's) was a 500 with a traceback in the log.
- A message content of neither shape read `messages.0.content.str: Input should be a valid string`.
- structured_outputs with a key it does not take (`jsn`) or a switch that is no boolean asked for nothing: a 200,
  unconstrained.
- A logit_bias key of non-ASCII digits ("²") read `logit_bias.².[key]: Input should be a valid integer`.
- /detokenize checked millions of ids on the event loop, every stream waiting; a million allowed_token_ids entries
  held the engine thread for seconds a step.
- A client that sent its headers and part of its body held its connection forever: no answer came.
- An API key with a non-ASCII character never matched the UTF-8 bytes curl sends (only latin-1).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.http import limits
from pdlaunch.http.auth import AccessPolicy, RequireAuth
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import ThreadServer, in_process_instance

API_KEY = "sk-audit-inputs"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 2048
TIMEOUT = 120.0  # a loaded 2-core machine
# As Llama 3 templates do: namespace() for state, a date string added to text, every message's tool calls.
TEMPLATE = (
    "{% set ns = namespace(turns=0) %}"
    "{% if date_string is defined %}{{ 'Today Date: ' + date_string }}{% endif %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% for m in messages %}<{{ m.role }}>"
    "{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}{% endfor %}"
    "{{ m.content }}{% set ns.turns = ns.turns + 1 %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, EngineLoop]]:
    template = tmp_path_factory.mktemp("template") / "llama_like.jinja"
    template.write_text(TEMPLATE)
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": MAX_MODEL_LEN, "chat_template": str(template)},
        "cache": {"num_gpu_blocks": 64},
        "security": {"api_key": API_KEY, "deployment_secret": "audit-inputs-secret-0123456789"},
    })
    with in_process_instance(cfg, "audit-inputs-0", max_pending_requests=16) as (url, loop):
        yield url, loop


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=TIMEOUT)


def assert_400(answer: httpx.Response, param: str, *says: str) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert all(part in error["message"] for part in says), error


def chat_body(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"messages": messages, "max_tokens": 2, **fields}


EMPTY_MESSAGES = [{"role": "user", "content": ""}] * 3000
LONG_CALL = [*HI, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": "' + "x" * 70_000 + '"}'}}]}]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize(("messages", "says"), [
    (EMPTY_MESSAGES, ["3000 message(s) of ", "cannot fit in max_model_len 2048", "send fewer or shorter messages"]),
    (LONG_CALL, ["2 message(s) of ", "cannot fit in max_model_len 2048"]),
], ids=["3000-empty-messages", "70000-character-tool-call"])
def test_a_chat_is_bounded_by_everything_its_template_renders(server: tuple[str, EngineLoop], path: str,
                                                              messages: list[dict[str, Any]], says: list[str]) -> None:
    """Refused before templating, as a long prompt is (before: rendered and tokenized, then refused by the engine for
    its tokens, or counted by /tokenize)."""
    url, _ = server
    body = chat_body(messages) if path.startswith("/v1") else {"messages": messages}
    assert_400(post(url, path, body), "messages", *says)


def test_tools_in_cjk_count_their_characters_once(server: tuple[str, EngineLoop]) -> None:
    """A tool description of 20,000 CJK characters fits the bound of 65,536 characters (it was counted as
    ASCII-escaped JSON, six characters each: a 400 saying 120,000)."""
    url, _ = server
    tools = [{"type": "function", "function": {"name": "f", "description": "天" * 20_000}}]
    answer = post(url, "/tokenize", {"messages": HI, "tools": tools})
    assert answer.status_code == 200, answer.text
    assert answer.json()["count"] > 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize(("kwargs", "param", "says"), [
    ({"date_string": 5}, "chat_template_kwargs",
     ["the chat template failed on this request's values (TypeError: can only concatenate str",
      "check the types of chat_template_kwargs"]),
    ({"namespace": 1}, "chat_template_kwargs.namespace", ["chat_template_kwargs may not set namespace"]),
    ({"raise_exception": "x"}, "chat_template_kwargs.raise_exception", ["may not set raise_exception"]),
], ids=["number-added-to-text", "shadows-namespace", "shadows-raise_exception"])
def test_a_template_failing_on_the_request_is_a_400(server: tuple[str, EngineLoop], path: str, kwargs: dict[str, Any],
                                                    param: str, says: list[str]) -> None:
    url, _ = server
    body: dict[str, Any] = {"messages": HI, "chat_template_kwargs": kwargs}
    if path.startswith("/v1"):
        body["max_tokens"] = 2
    assert_400(post(url, path, body), param, *says)
    fine = post(url, path, {**body, "chat_template_kwargs": {"date_string": "26 Jul 2024"}})
    assert fine.status_code == 200, fine.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize(("content", "got"), [(5, "an integer"), (["hi"], "a list of strings"),
                                              ({"type": "text"}, "an object")])
def test_a_content_of_neither_shape_names_the_content(server: tuple[str, EngineLoop], path: str, content: object,
                                                       got: str) -> None:
    url, _ = server
    messages = [{"role": "user", "content": content}]
    body = chat_body(messages) if path.startswith("/v1") else {"messages": messages}
    assert_400(post(url, path, body), "messages.0.content",
               f"messages.0.content: must be a string, a list of content parts or null (got {got})")


@pytest.mark.parametrize(("options", "param", "says"), [
    ({"jsn": {"type": "object"}}, "structured_outputs.jsn",
     ["structured_outputs.jsn is not an option of structured_outputs (it takes json, regex, choice"]),
    ({"choice": ["a", "b"], "disable_any_whitespace": "no"}, "structured_outputs.disable_any_whitespace",
     ["structured_outputs.disable_any_whitespace must be true or false"]),
    ({"json_object": "no"}, "structured_outputs.json_object", ["structured_outputs.json_object must be true or false"]),
], ids=["misspelt-json", "string-switch", "string-json_object"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_structured_outputs_takes_only_its_options(server: tuple[str, EngineLoop], path: str, options: dict[str, Any],
                                                    param: str, says: list[str]) -> None:
    url, _ = server
    prompt: dict[str, Any] = {"prompt": "hi"} if path == "/v1/completions" else {"messages": HI}
    assert_400(post(url, path, {**prompt, "max_tokens": 4, "structured_outputs": options}), param, *says)
    fine = post(url, path, {**prompt, "max_tokens": 4, "structured_outputs": {"choice": ["yes", "no"],
                                                                              "disable_any_whitespace": True}})
    assert fine.status_code == 200, fine.text


@pytest.mark.parametrize("key", ["²", "٣", "1²"])
def test_a_logit_bias_key_of_other_digits_is_named(server: tuple[str, EngineLoop], key: str) -> None:
    url, _ = server
    answer = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "logit_bias": {key: 5}})
    assert_400(answer, "logit_bias", f"logit_bias: key {key!r} is not a token id", '{"50256": -100}')


def test_allowed_token_ids_reach_the_engine_once_each(server: tuple[str, EngineLoop]) -> None:
    """The sampler masks the logits with every entry at every step: 1,000,000 entries (2 ids repeated) held the engine
    thread, every stream of the instance, for seconds a step."""
    url, loop = server
    engine = loop.engine
    add_request = engine.add_request
    seen: list[list[int] | None] = []

    def recording(request_id: str, prompt: list[int], params: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(params.allowed_token_ids)
        return add_request(request_id, prompt, params, *args, **kwargs)

    engine.add_request = recording  # type: ignore[method-assign]
    try:
        answer = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "return_token_ids": True,
                                               "allowed_token_ids": [7, 3] * 500_000})
    finally:
        engine.add_request = add_request  # type: ignore[method-assign]
    assert answer.status_code == 200, answer.text
    assert seen == [[3, 7]]
    assert set(answer.json()["choices"][0]["token_ids"]) <= {3, 7}


class _ThreadOfComparison(int):
    """A vocabulary size that notes the thread comparing a token id with it."""

    threads: list[str]

    def __gt__(self, other: object) -> bool:
        self.threads.append(threading.current_thread().name)
        return int(self) > other  # type: ignore[operator]

    def __le__(self, other: object) -> bool:
        self.threads.append(threading.current_thread().name)
        return int(self) <= other  # type: ignore[operator]


def test_detokenize_checks_the_ids_off_the_event_loop(server: tuple[str, EngineLoop]) -> None:
    url, loop = server
    tokenizer = loop.engine.tokenizer
    vocab = tokenizer.vocab_size
    recording = _ThreadOfComparison(vocab)
    recording.threads = []
    tokenizer.vocab_size = recording
    try:
        answer = post(url, "/detokenize", {"tokens": [1] * 1000 + [vocab]})
    finally:
        tokenizer.vocab_size = vocab
    assert_400(answer, "tokens", f"tokens[1000] = {vocab} is not a token id")
    assert recording.threads, "the ids were never compared with the vocabulary size"
    assert all(name.startswith("asyncio_") for name in set(recording.threads)), set(recording.threads)


def test_a_body_that_stops_arriving_is_answered_408(server: tuple[str, EngineLoop],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = server
    monkeypatch.setattr(limits, "BODY_IDLE_SECONDS", 1.0)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: {AUTH['Authorization']}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode() + b'{"prompt": ')
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)  # socket timeout: 60 s with no byte fails the test
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    error = json.loads(body)["error"]
    assert error["param"] == "body" and error["code"] == "request_timeout", error
    assert error["message"] == ("the request body stopped arriving: 11 bytes of the 100 its Content-Length announced "
                                "came, then nothing for 1 s; send the whole body"), error


API_KEY_UTF8 = "sk-clé-secrète"


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    await PlainTextResponse(Request(scope, receive).url.path)(scope, receive, send)


@pytest.fixture(scope="module")
def utf8_key_server() -> Iterator[str]:
    port = PortAllocator("127.0.0.1").free("auth test server")
    app = RequireAuth(_ok, AccessPolicy.from_secrets(API_KEY_UTF8, None))
    with ThreadServer(app, port) as srv:
        yield srv.url


@pytest.mark.parametrize(("header", "status"), [
    (b"Bearer " + API_KEY_UTF8.encode(), 200),  # as curl sends a key typed in a UTF-8 terminal
    (b"Bearer " + API_KEY_UTF8.encode("latin-1"), 200),  # as Python's http.client sends it
    (b"Bearer sk-cl\xc3\xa9", 401),  # its first bytes
    (b"Bearer " + API_KEY_UTF8.encode() + b"x", 401),
    (b"Bearer \xff\xfe", 401),
    (b"Basic " + API_KEY_UTF8.encode(), 401),
])
def test_a_non_ascii_api_key_is_the_bytes_a_client_sends(utf8_key_server: str, header: bytes, status: int) -> None:
    answer = httpx.get(f"{utf8_key_server}/v1/models", headers={"Authorization": header}, timeout=30)
    assert answer.status_code == status, answer.text
    if status == 401:
        assert answer.json()["error"]["code"] == "invalid_api_key" and answer.headers["www-authenticate"] == "Bearer"


def test_a_non_ascii_api_key_never_matches_text_outside_latin_1() -> None:
    """A caller other than the middleware (its headers are bytes read as latin-1) may hand any text."""
    policy = AccessPolicy.from_secrets(API_KEY_UTF8, None)
    error = policy.check("/v1/models", "Bearer 天", None)
    assert error is not None and error.status == 401
    assert policy.check("/v1/models", "Bearer " + API_KEY_UTF8.encode().decode("latin-1"), None) is None
