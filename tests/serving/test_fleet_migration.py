"""Request migration (proxy/migrate.py) on request shapes beyond plain greedy text, against a real engine.

One in-process instance (tiny model, CPU) serves every leg. The proxy sees it twice: as `colocated-0`, through
a relay that ends a stream after the event the test picks (no [DONE]: a decode that died mid-stream), and as
`colocated-1`, directly, where the request goes on. Each test compares the migrated stream with the
uninterrupted answer of the same instance: fields the continuation must carry (include_stop_str_in_output,
repetition_penalty), the usage of the whole request, the token ids a client asked for, and requests that must
not migrate (logprobs: 0, tools cut mid-call) end with the error event rather than with output that lost a field.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.http.sse import SSEParser, sse_data
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.serving.helpers import ThreadServer, in_process_instance, wait_for

TIMEOUT_S = 60.0
PROMPT = "The proxy in front of them makes the pair look like one server"  # 14 tokens with BOS
Cut = Callable[[int, dict[str, Any]], bool]  # (text events relayed so far, the event) -> end the stream after it


def after_text_events(count: int) -> Cut:
    return lambda texts, event: texts >= count


def after_the_finish(texts: int, event: dict[str, Any]) -> bool:
    return any(c.get("finish_reason") for c in event.get("choices", []))


class CuttingRelay:
    """Relays /health and the completion routes to `target`; a stream ends (without [DONE]) after the event
    `cut` picks. `cut` None: relayed whole."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.cut: Cut | None = None
        self.cuts = 0
        self.app = FastAPI()
        self.app.get("/health")(self.health)
        self.app.post("/v1/completions")(self.relay)
        self.app.post("/v1/chat/completions")(self.relay)

    async def health(self) -> Response:
        async with httpx.AsyncClient(trust_env=False) as client:
            answer = await client.get(self.target + "/health", timeout=5)
        return JSONResponse(answer.json(), status_code=answer.status_code)

    async def relay(self, request: Request) -> Response:
        body = await request.json()
        client = httpx.AsyncClient(trust_env=False, timeout=TIMEOUT_S)
        upstream = await client.send(client.build_request("POST", self.target + request.url.path, json=body),
                                     stream=True)
        if not body.get("stream"):
            content = await upstream.aread()
            await upstream.aclose()
            await client.aclose()
            return Response(content, status_code=upstream.status_code, media_type="application/json")

        async def events() -> AsyncIterator[bytes]:
            parser, texts = SSEParser(), 0
            try:
                async for raw in upstream.aiter_raw():
                    for data in parser.feed(raw):
                        yield sse_data(data)
                        if data == "[DONE]" or self.cut is None:
                            continue
                        event = json.loads(data)
                        texts += any(c.get("text") or (c.get("delta") or {}).get("content")
                                     for c in event.get("choices", []))
                        if self.cut(texts, event):
                            self.cuts += 1
                            return  # the decode "died": the rest never comes
            finally:
                await upstream.aclose()
                await client.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")


@dataclass
class Fleet:
    proxy: str  # the proxy's URL
    instance: str  # the real instance's URL
    relay: CuttingRelay
    migrations: Callable[[], float] = field(default=lambda: 0.0)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": 256},
        "cache": {"num_gpu_blocks": 96, "block_size": 16},
    })
    ports = PortAllocator("127.0.0.1")
    with in_process_instance(cfg, "fleet-migration-0") as (url, _):
        relay = CuttingRelay(url)
        with ThreadServer(relay.app, ports.free("relay")) as cutting:
            pool = InstancePool([Instance("colocated", cutting.url, "colocated-0"),
                                 Instance("colocated", url, "colocated-1")])
            pool.policy.choose = lambda role, ready: ready[0]  # type: ignore[method-assign]  # the relay first
            app = build_proxy_app(pool, TIMEOUT_S, migration_limit=1)
            with ThreadServer(app, ports.free("proxy")) as proxy:
                wait_for(lambda: httpx.get(f"{proxy.url}/health", trust_env=False).status_code == 200,
                         "the proxy to see the relay and the instance ready")

                def migrations() -> float:
                    text = httpx.get(f"{proxy.url}/metrics", timeout=10, trust_env=False).text
                    return sum(float(line.split()[-1]) for line in text.splitlines()
                               if line.startswith("pdlaunch_proxy_migrations_total{"))

                yield Fleet(proxy.url, url, relay, migrations)


def _stream(url: str, path: str, body: dict[str, Any]) -> list[Any]:
    """Every SSE payload of a streamed answer: dicts, and the string "[DONE]"."""
    events: list[Any] = []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=TIMEOUT_S, trust_env=False) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return events


def _whole(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.post(url + path, json={**body, "stream": False}, timeout=TIMEOUT_S, trust_env=False)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def _text(events: list[Any]) -> str:
    return "".join(c.get("text") or (c.get("delta") or {}).get("content") or ""
                   for e in events if isinstance(e, dict) for c in e.get("choices", []))


def _errors(events: list[Any]) -> list[Any]:
    return [e["error"] for e in events if isinstance(e, dict) and "error" in e]


def _migrated(fleet: Fleet, path: str, body: dict[str, Any], cut: Cut) -> list[Any]:
    """The streamed answer through the proxy, its first decode leg cut by `cut` (asserted: once, migrated)."""
    cuts, moved = fleet.relay.cuts, fleet.migrations()
    fleet.relay.cut = cut
    try:
        events = _stream(fleet.proxy, path, body)
    finally:
        fleet.relay.cut = None
    assert fleet.relay.cuts == cuts + 1, "the relay never cut the stream: the test proves nothing"
    assert fleet.migrations() == moved + 1
    return events


COMPLETION = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}


def test_include_stop_str_in_output_keeps_the_stop_tokens_text_after_a_migration(fleet: Fleet) -> None:
    """A stop token id that ends the continuation is shown as it would be without the migration."""
    ids = _whole(fleet.instance, "/v1/completions", {**COMPLETION, "return_token_ids": True})["choices"][0]["token_ids"]
    stop = next(t for j, t in enumerate(ids) if j >= 8 and t not in ids[:j])  # past the cut below
    body = {**COMPLETION, "stop_token_ids": [stop], "include_stop_str_in_output": True}
    shown = _whole(fleet.instance, "/v1/completions", body)["choices"][0]
    hidden = _whole(fleet.instance, "/v1/completions", {**body, "include_stop_str_in_output": False})["choices"][0]
    assert shown["finish_reason"] == "stop" and shown["text"] != hidden["text"], "the stop token shows no text"
    events = _migrated(fleet, "/v1/completions", body, after_text_events(3))
    assert not _errors(events) and events[-1] == "[DONE]"
    assert _text(events) == shown["text"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_repetition_penalty_goes_on_as_it_would_have(fleet: Fleet, path: str) -> None:
    """The penalty counts prompt and output tokens: the continuation, whose prompt holds the output so far,
    penalizes the same tokens, and a greedy stream's text is the uninterrupted one's."""
    body: dict[str, Any] = {"max_tokens": 24, "temperature": 0, "ignore_eos": True, "repetition_penalty": 1.4}
    body |= {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": PROMPT}]}
    reference = _whole(fleet.instance, path, body)["choices"][0]
    events = _migrated(fleet, path, body, after_text_events(4))
    assert not _errors(events) and events[-1] == "[DONE]"
    assert _text(events) == reference.get("text", (reference.get("message") or {}).get("content"))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_usage_after_a_migration_counts_the_clients_prompt_once(fleet: Fleet, path: str) -> None:
    """prompt_tokens: the client's prompt; completion_tokens: every output token once; the continuation's
    decode, which caches the output ids it was sent as prompt, does not report more cached tokens than the
    client's prompt has."""
    asked = COMPLETION if path == "/v1/completions" else \
        {**{k: v for k, v in COMPLETION.items() if k != "prompt"}, "messages": [{"role": "user", "content": PROMPT}]}
    body = {**asked, "stream_options": {"include_usage": True}}
    reference = _whole(fleet.instance, path, asked)["usage"]
    events = _migrated(fleet, path, body, after_text_events(10))
    assert not _errors(events) and events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    assert events[-2]["choices"] == [] and events[-2]["object"] == events[0]["object"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == \
        (reference["prompt_tokens"], reference["completion_tokens"], reference["total_tokens"])
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]


@pytest.mark.parametrize("options", [{"include_usage": True}, {}])
def test_a_decode_that_dies_after_the_last_token_still_gives_the_usage_asked_for(fleet: Fleet,
                                                                                  options: dict[str, bool]) -> None:
    """max_tokens reached at the cut: nothing is continued, and stream_options.include_usage true still gets its
    chunk; `{}` (include_usage false by default, as vLLM's and OpenAI's) gets none from the proxy either."""
    body = {**COMPLETION, "stream_options": options}
    reference = _whole(fleet.instance, "/v1/completions", COMPLETION)
    cuts = fleet.relay.cuts
    fleet.relay.cut = after_the_finish
    try:
        events = _stream(fleet.proxy, "/v1/completions", body)
    finally:
        fleet.relay.cut = None
    assert fleet.relay.cuts == cuts + 1
    assert not _errors(events) and events[-1] == "[DONE]" and _text(events) == reference["choices"][0]["text"]
    usage_chunks = [e for e in events if isinstance(e, dict) and e.get("usage")]
    if not options.get("include_usage"):
        assert not usage_chunks, events[-3:]
        return
    assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == [], events[-3:]
    usage = usage_chunks[0]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == \
        (reference["usage"]["prompt_tokens"], reference["usage"]["completion_tokens"],
         reference["usage"]["total_tokens"])
    assert usage_chunks[0]["id"] == events[0]["id"] and usage_chunks[0]["object"] == "text_completion"


def test_token_ids_the_client_asked_for_come_once_each(fleet: Fleet) -> None:
    """return_token_ids: the prompt's ids once (the client's prompt, not the continuation's), every output id
    once, in order."""
    body = {**COMPLETION, "return_token_ids": True}
    reference = _whole(fleet.instance, "/v1/completions", body)["choices"][0]
    events = _migrated(fleet, "/v1/completions", body, after_text_events(5))
    choices = [c for e in events if isinstance(e, dict) for c in e.get("choices", [])]
    prompts = [c["prompt_token_ids"] for c in choices if "prompt_token_ids" in c]
    assert prompts == [reference["prompt_token_ids"]]
    assert [t for c in choices for t in c.get("token_ids", [])] == reference["token_ids"]
    assert _text(events) == reference["text"]


def test_logprobs_zero_is_not_continued_without_its_logprobs(fleet: Fleet) -> None:
    """logprobs: 0 asks for the chosen tokens' logprobs, which a continuation does not carry: the stream ends
    with the error event, as for any logprobs, instead of going on with `logprobs: null`."""
    body = {**COMPLETION, "logprobs": 0}
    cuts, moved = fleet.relay.cuts, fleet.migrations()
    fleet.relay.cut = after_text_events(3)
    try:
        events = _stream(fleet.proxy, "/v1/completions", body)
    finally:
        fleet.relay.cut = None
    assert fleet.relay.cuts == cuts + 1 and fleet.migrations() == moved
    texts = [c for e in events if isinstance(e, dict) for c in e.get("choices", []) if c.get("text")]
    assert texts and all(c["logprobs"] is not None for c in texts)
    errors = _errors(events)
    assert [e["code"] for e in errors] == ["instance_failed"] and "not migrated: its `logprobs` field" in \
        errors[0]["message"], errors


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_seeded_sampled_stream_is_the_uninterrupted_runs_text(fleet: Fleet, path: str) -> None:
    """The continuation carries seed_offset (the output ids in its prompt): its generator skips the draws those
    tokens took, so a seeded sample goes on as the uninterrupted run did, as a greedy stream does."""
    body: dict[str, Any] = {"max_tokens": 24, "temperature": 0.9, "seed": 11, "ignore_eos": True}
    body |= {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": PROMPT}]}
    reference = _whole(fleet.instance, path, body)["choices"][0]
    events = _migrated(fleet, path, {**body, "stream_options": {"include_usage": True}}, after_text_events(4))
    assert not _errors(events) and events[-1] == "[DONE]"
    assert _text(events) == reference.get("text", (reference.get("message") or {}).get("content"))
    assert events[-2]["usage"]["completion_tokens"] == body["max_tokens"]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def after_events(count: int) -> Cut:
    seen = [0]

    def cut(texts: int, event: dict[str, Any]) -> bool:
        seen[0] += 1
        return seen[0] >= count

    return cut


def _said(events: list[Any]) -> str:
    """A chat stream's content and tool call arguments, in order."""
    deltas = [c.get("delta") or {} for e in events if isinstance(e, dict) for c in e.get("choices", [])]
    return "".join((d.get("content") or "") + "".join(str((t.get("function") or {}).get("arguments") or "")
                                                      for t in d.get("tool_calls") or []) for d in deltas)


@pytest.mark.parametrize("tool_choice", ["auto", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_tool_calling_stream_cut_mid_way_is_not_continued(fleet: Fleet, tool_choice: Any) -> None:
    """With tools the tool parser holds text back and a forced call's grammar has state, neither rebuilt from token
    ids: a stream whose decode dies mid-way (mid-call for a named tool_choice) is not continued, which would repeat
    or lose what the parser held back; it ends with the error event naming `tools`, what the client got shown once,
    as the uninterrupted run began."""
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 40, "temperature": 0, "tools": TOOLS,
            "tool_choice": tool_choice}
    reference = _stream(fleet.instance, "/v1/chat/completions", body)
    cuts, moved = fleet.relay.cuts, fleet.migrations()
    fleet.relay.cut = after_events(4)
    try:
        events = _stream(fleet.proxy, "/v1/chat/completions", body)
    finally:
        fleet.relay.cut = None
    assert fleet.relay.cuts == cuts + 1 and fleet.migrations() == moved
    errors = _errors(events)
    assert [e["code"] for e in errors] == ["instance_failed"] and "not migrated: its `tools` field" in \
        errors[0]["message"], errors
    got = [e for e in events if isinstance(e, dict) and "error" not in e]
    assert len(got) == 4 and _said(got) == _said(reference[:4]) and _said(got), (got, reference[:4])
    if tool_choice != "auto":  # cut mid-call: the call's name and the start of its arguments
        assert got[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_a_stream_with_tools_and_tool_choice_none_goes_on_as_it_would_have(fleet: Fleet) -> None:
    """tool_choice "none": the tools reach the template (in the prompt's ids the continuation carries) and the
    output is plain content, never parsed nor held back (server/tool_calls.py): a stream whose decode dies mid-way is
    continued as any chat, and its greedy text equals the uninterrupted run's."""
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "tools": TOOLS, "tool_choice": "none"}
    reference = _whole(fleet.instance, "/v1/chat/completions", body)["choices"][0]
    assert reference["message"]["content"] and not reference["message"].get("tool_calls")
    events = _migrated(fleet, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}},
                       after_text_events(4))
    assert not _errors(events) and events[-1] == "[DONE]"
    assert _text(events) == reference["message"]["content"]
    assert events[-2]["usage"]["completion_tokens"] == body["max_tokens"]
    assert [c["finish_reason"] for e in events if isinstance(e, dict) for c in e.get("choices", [])
            if c.get("finish_reason")] == ["length"]
