"""A PD decode request the SERVER ends before its engine ever sees it tells its prefill to drop the hold, which frees
the prompt's blocks at once, not at the lease's end (kv_transfer.kv_lease_seconds, 60 s by default). The engine's
own refusals and aborts release (test_unloaded_decode_release_e2e.py); these never reach engine.add_request:
- its client leaves while its grammar's matcher is built (on a grammar thread, server/engine_loop.py);
- its client leaves while its add waits in the engine thread's queue (a step, or a call, holds that thread);
- its grammar is refused when the matcher is built (a 400);
- its client leaves while its prompt is tokenized (off the event loop), before the server submitted it at all;
- the server refuses it before it submits it (min_tokens past the room its prompt leaves: a 400 the prefill leg,
  with its max_tokens 1, never met).
Real components in this process: a tiny prefill and decode instance (real engines and servers, NIXL on CPU); the test
sends both legs itself, as a proxy that does not release holds (vLLM's) would. A 600 s lease: what frees the
prefill's blocks within the test's wait is the decode's word. The client leaves by closing its socket.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from pdlaunch.engine import structured_output
from pdlaunch.errors import EngineError
from pdlaunch.server import prompts
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import held_kv, wait_for
from tests.serving.tiny_instances import MODEL, TIMEOUT, TinyPD, prefill_leg, tiny_pd

pytestmark = pytest.mark.slow

LEASE_S = 600.0  # the prefill's hold must end by the decode's word, never by its lease
WAIT_S = 60.0  # generous for a loaded 2-core machine, and far below the lease
PROMPT = list(range(60, 100))  # 40 token ids: 5 blocks of 8
CHOICE = {"guided_choice": ["yes", "no"]}


@pytest.fixture(scope="module")
def deployment() -> Iterator[TinyPD]:
    with tiny_pd("server-ended", connector="nixl", kv_lease_seconds=LEASE_S) as pd:
        yield pd


def _held_leg(pd: TinyPD) -> tuple[dict[str, Any], tuple[int, int]]:
    """A prefill leg's signed params, which the prefill holds the prompt's KV for, and the prefill's (held requests,
    used blocks) before it."""
    before = held_kv(pd.prefill)
    params = prefill_leg(pd, PROMPT)
    assert held_kv(pd.prefill)[0] == before[0] + 1
    return params, before


def _released(pd: TinyPD, before: tuple[int, int]) -> None:
    wait_for(lambda: held_kv(pd.prefill) == before, "the prefill to drop its hold (its lease is 600 s)", WAIT_S)


def _decode_body(params: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0.0, "kv_transfer_params": params,
            **fields}


def _send(url: str, body: dict[str, Any], route: str = "/v1/completions") -> socket.socket:
    """A connection that has sent POST `route` with `body` and waits for its answer: closing it is the client
    leaving."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    data = json.dumps(body).encode()
    conn = socket.create_connection((host, port), timeout=TIMEOUT)
    conn.sendall(f"POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return conn


def _gone(decode: EngineLoop, conn: socket.socket) -> None:
    """The client leaves, and the decode's server has seen it (the request's stream is dropped)."""
    conn.close()
    wait_for(lambda: decode.num_pending == 0, "the decode to see its client leave", WAIT_S)


def test_a_client_that_leaves_while_its_grammar_builds_releases_the_prefill(
        deployment: TinyPD, monkeypatch: pytest.MonkeyPatch) -> None:
    params, before = _held_leg(deployment)
    decode = deployment.loops[1]
    building, gate = threading.Event(), threading.Event()
    build = structured_output.GrammarBackend.matcher

    def held_build(self: structured_output.GrammarBackend, spec: structured_output.StructuredOutput) -> object:
        building.set()
        assert gate.wait(TIMEOUT), "the test never let the matcher build go on"
        return build(self, spec)

    monkeypatch.setattr(structured_output.GrammarBackend, "matcher", held_build)
    conn = _send(deployment.decode, _decode_body(params, **CHOICE))
    try:
        assert building.wait(TIMEOUT), "the decode request never reached its matcher's build"
        _gone(decode, conn)
    finally:
        gate.set()
        conn.close()
    _released(deployment, before)


def test_a_client_that_leaves_while_its_add_is_queued_releases_the_prefill(deployment: TinyPD) -> None:
    params, before = _held_leg(deployment)
    decode = deployment.loops[1]
    gate = threading.Event()

    def hold() -> None:  # a call that keeps the decode's engine thread busy: the add waits in its queue
        asyncio.run(decode.call(lambda _: gate.wait(TIMEOUT), timeout=TIMEOUT))

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    conn = _send(deployment.decode, _decode_body(params))
    try:
        wait_for(lambda: decode.num_pending == 1, "the decode request to wait behind the held engine thread", WAIT_S)
        _gone(decode, conn)
    finally:
        gate.set()
        conn.close()
        holder.join(TIMEOUT)
    _released(deployment, before)


def test_a_decode_request_whose_grammar_is_refused_releases_the_prefill(
        deployment: TinyPD, monkeypatch: pytest.MonkeyPatch) -> None:
    params, before = _held_leg(deployment)

    def refused(self: structured_output.GrammarBackend, spec: structured_output.StructuredOutput) -> object:
        raise EngineError(f"{spec.field}: the token table refuses it", field=spec.field)

    monkeypatch.setattr(structured_output.GrammarBackend, "matcher", refused)
    r = httpx.post(f"{deployment.decode}/v1/completions", timeout=TIMEOUT, json=_decode_body(params, **CHOICE))
    assert r.status_code == 400 and "the token table refuses it" in r.text, r.text
    _released(deployment, before)


def test_a_client_that_leaves_while_its_chat_prompt_is_tokenized_releases_the_prefill(
        deployment: TinyPD, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request is never submitted: the release cannot come from the engine thread's queue."""
    messages = [{"role": "user", "content": "tell me about the sea"}]
    before = held_kv(deployment.prefill)
    leg = httpx.post(f"{deployment.prefill}/v1/chat/completions", timeout=TIMEOUT, json={
        "model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0.0,
        "kv_transfer_params": {"do_remote_decode": True}})
    assert leg.status_code == 200, leg.text
    assert held_kv(deployment.prefill)[0] == before[0] + 1
    tokenizing, gate = threading.Event(), threading.Event()
    tokenize = prompts.tokenize

    def held_tokenize(tokenizer: Any, prompt: prompts.Prompt) -> list[int]:
        tokenizing.set()
        assert gate.wait(TIMEOUT), "the test never let the tokenizer go on"
        return tokenize(tokenizer, prompt)

    monkeypatch.setattr(prompts, "INLINE_PROMPT_CHARS", 0)  # every prompt is tokenized on a worker thread
    monkeypatch.setattr(prompts, "tokenize", held_tokenize)
    conn = _send(deployment.decode, {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0.0,
                                     "kv_transfer_params": leg.json()["kv_transfer_params"]}, "/v1/chat/completions")
    try:
        assert tokenizing.wait(TIMEOUT), "the decode request never reached its tokenizer"
        conn.close()
        _released(deployment, before)  # the tokenizer is still held: the request was never submitted
        assert deployment.loops[1].num_pending == 0
    finally:
        gate.set()
        conn.close()


def test_a_decode_request_the_server_refuses_before_submitting_it_releases_the_prefill(deployment: TinyPD) -> None:
    params, before = _held_leg(deployment)
    # max_tokens null: its limit is the room its prompt leaves (known once it is tokenized), which min_tokens passes
    body = _decode_body(params, min_tokens=250, max_tokens=None)
    r = httpx.post(f"{deployment.decode}/v1/completions", timeout=TIMEOUT, json=body)
    assert r.status_code == 400 and "does not fit: the prompt has 40 tokens" in r.text, r.text
    _released(deployment, before)


def test_a_decode_request_refused_for_its_decode_only_fields_releases_the_prefill(deployment: TinyPD) -> None:
    """min_tokens past max_tokens: refused as its fields are read, before its choices exist. A proxy drops min_tokens
    from the prefill leg (its max_tokens is 1), which the prefill therefore held the KV for."""
    params, before = _held_leg(deployment)
    r = httpx.post(f"{deployment.decode}/v1/completions", timeout=TIMEOUT, json=_decode_body(params, min_tokens=8))
    assert r.status_code == 400 and "min_tokens" in r.text, r.text
    _released(deployment, before)
