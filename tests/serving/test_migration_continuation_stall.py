"""A continuation (proxy/migrate.py) that fails in turn: one whose new decode stalls before its stream's headers
moves on again, as the first leg does, rather than holding the client until the request's deadline; one whose
decode dies before making the held-back ids again leaves the next to make them, shown once; the ids a client gets
are those of its text where the next decode makes other ids than the held-back ones."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.helpers.stalling_instance import StallingInstance
from tests.proxy.test_retried_decode_leg_kv import _dropping
from tests.serving.helpers import ThreadServer, wait_for

REQUEST_TIMEOUT_S = 20.0  # the proxy's deadline; the move to the third decode takes about 1 s + the health timeout


class _Decode(StallingInstance):
    """`mode` first: one chunk ("A", its id, the prompt's ids) and the end without [DONE] (a decode that died);
    stall: takes the continuation, never answers it, and its /health stops answering; finish: "B" and [DONE]."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode, self.bodies = mode, []

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        self.bodies.append(body)
        if self.mode == "stall":
            await self.stall()
        choice: dict[str, Any] = {"index": 0, "text": "A", "finish_reason": None, "token_ids": [7]}
        if self.mode == "first":
            choice["prompt_token_ids"] = [1, 2]
        else:
            choice |= {"text": "B", "finish_reason": "length", "token_ids": [8]}
        chunk = {"id": "cmpl-s", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}

        async def events() -> AsyncIterator[bytes]:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            if self.mode != "first":
                yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def test_a_continuation_whose_decode_stalls_before_its_headers_goes_on_elsewhere() -> None:
    ports = PortAllocator("127.0.0.1")
    first, stalling, finishing = _Decode("first"), _Decode("stall"), _Decode("finish")
    with ThreadServer(first.app, ports.free("d0")) as d0, ThreadServer(stalling.app, ports.free("d1")) as d1, \
            ThreadServer(finishing.app, ports.free("d2")) as d2:
        pool = InstancePool([Instance("colocated", d.url, f"colocated-{i}") for i, d in enumerate((d0, d1, d2))],
                            health_timeout_s=0.5)
        app = build_proxy_app(pool, REQUEST_TIMEOUT_S, migration_limit=3)
        with ThreadServer(app, ports.free("proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see all three")
            taken = {"colocated-0": first.bodies, "colocated-1": stalling.bodies, "colocated-2": finishing.bodies}
            # d0, then d1, then d2: the one given the fewest legs, the first of equals
            pool.policy.choose = lambda role, ready: min(  # type: ignore[method-assign]
                ready, key=lambda i: len(taken[i.name]))
            started = time.monotonic()
            text = httpx.post(f"{proxy.url}/v1/completions", json={"prompt": "go", "max_tokens": 2, "stream": True},
                              timeout=REQUEST_TIMEOUT_S + 10).text
            took = time.monotonic() - started
            metrics = httpx.get(f"{proxy.url}/metrics", timeout=10).text
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert [e["choices"][0]["text"] for e in events] == ["A", "B"], text
    assert text.endswith("data: [DONE]\n\n") and took < REQUEST_TIMEOUT_S, (took, text[-300:])
    assert [b["prompt"] for b in stalling.bodies + finishing.bodies] == [[1, 2, 7], [1, 2, 7]]
    assert 'pdlaunch_proxy_migrations_total{reason="stalled"} 1.0' in metrics
    assert 'pdlaunch_proxy_migrations_total{reason="died"} 1.0' in metrics


class _Scripted:
    """Streams the chunks (text, token ids, finish_reason) of its next script, then [DONE] when the last one
    finishes, or ends there (a decode that died)."""

    def __init__(self, scripts: list[list[tuple[str, list[int], str | None]]]) -> None:
        self.scripts, self.bodies = scripts, []
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.post("/v1/completions")(self.completions)

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        self.bodies.append(body)
        script = self.scripts.pop(0)

        async def events() -> AsyncIterator[bytes]:
            for i, (text, ids, finish) in enumerate(script):
                choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish, "token_ids": ids}
                if i == 0 and not isinstance(body["prompt"], list):
                    choice["prompt_token_ids"] = [1, 2]
                chunk = {"id": "cmpl-t", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            if script and script[-1][2] is not None:
                yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def test_ids_held_back_come_once_though_a_continuation_dies_before_making_them_again() -> None:
    """The client (return_token_ids) has id 9, whose text was held back; the first continuation dies before it
    makes 9 again, the second makes it: 9 is shown once."""
    ports = PortAllocator("127.0.0.1")
    d0 = _Scripted([[("A", [7], None), ("", [9], None)]])  # dies with 9's text held back
    d1 = _Scripted([[]])  # dies before its first chunk
    d2 = _Scripted([[("é", [9], None), ("C", [10], "length")]])
    with ThreadServer(d0.app, ports.free("d0")) as s0, ThreadServer(d1.app, ports.free("d1")) as s1, \
            ThreadServer(d2.app, ports.free("d2")) as s2:
        pool = InstancePool([Instance("colocated", s.url, f"colocated-{i}") for i, s in enumerate((s0, s1, s2))])
        app = build_proxy_app(pool, REQUEST_TIMEOUT_S, migration_limit=3)
        with ThreadServer(app, ports.free("proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see all three")
            taken = {"colocated-0": d0.bodies, "colocated-1": d1.bodies, "colocated-2": d2.bodies}
            pool.policy.choose = lambda role, ready: min(  # type: ignore[method-assign]
                ready, key=lambda i: len(taken[i.name]))
            text = httpx.post(f"{proxy.url}/v1/completions", timeout=REQUEST_TIMEOUT_S + 10,
                              json={"prompt": "go", "max_tokens": 3, "stream": True, "return_token_ids": True}).text
    choices = [json.loads(line[6:])["choices"][0] for line in text.splitlines() if line.startswith("data: {")]
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    assert "".join(c["text"] for c in choices) == "AéC"
    assert [t for c in choices for t in c["token_ids"]] == [7, 9, 10]
    assert [b["prompt"] for b in d1.bodies + d2.bodies] == [[1, 2, 7], [1, 2, 7]]


def test_the_ids_a_client_gets_are_those_of_its_text_when_the_continuation_makes_other_ids() -> None:
    """An id whose text the dead decode held back (9: a character not complete yet) is made again by the next
    decode, which, sampling without a seed (or on other hardware), may make another (11). The client asking for
    token ids gets each with the chunk that carries its text: it gets [7, 11, 10], the ids of the text it gets (one
    sampled sequence), not 9 (whose text never came) followed by the continuation's 10."""
    ports = PortAllocator("127.0.0.1")
    d0 = _Scripted([[("A", [7], None), ("", [9], None)]])  # dies with 9's text held back
    d1 = _Scripted([[("é", [11], None), ("C", [10], "length")]])
    with ThreadServer(d0.app, ports.free("d0")) as s0, ThreadServer(d1.app, ports.free("d1")) as s1:
        pool = InstancePool([Instance("colocated", s.url, f"colocated-{i}") for i, s in enumerate((s0, s1))])
        app = build_proxy_app(pool, REQUEST_TIMEOUT_S, migration_limit=1)
        with ThreadServer(app, ports.free("proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see both")
            pool.policy.choose = lambda role, ready: ready[0]  # type: ignore[method-assign]  # d0 first
            text = httpx.post(f"{proxy.url}/v1/completions", timeout=REQUEST_TIMEOUT_S + 10, json={
                "prompt": "go", "max_tokens": 3, "temperature": 1.0, "stream": True, "return_token_ids": True}).text
    choices = [json.loads(line[6:])["choices"][0] for line in text.splitlines() if line.startswith("data: {")]
    assert text.endswith("data: [DONE]\n\n") and "error" not in text, text[-300:]
    assert [b["prompt"] for b in d1.bodies] == [[1, 2, 7]]  # 9 is made again
    assert [(c["text"], c["token_ids"]) for c in choices] == [("A", [7]), ("é", [11]), ("C", [10])]
    assert [c["prompt_token_ids"] for c in choices if "prompt_token_ids" in c] == [[1, 2]]


def test_a_continuation_whose_decode_and_retry_both_drop_the_connection_goes_on_on_a_third() -> None:
    """The continuation's decode drops the connection before its headers, and so does the one retry.py sends it to
    (two decodes gone at once, before the probe saw them): a third ready decode takes it, within the limit, rather
    than the client's stream ending with the second's error event."""
    ports = PortAllocator("127.0.0.1")
    d0 = _Scripted([[("A", [7], None)]])  # dies mid-stream
    d3 = _Scripted([[("B", [8], "length")]])
    gone: list[list[dict[str, Any]]] = [[], []]
    with ExitStack() as stack:
        s0 = stack.enter_context(ThreadServer(d0.app, ports.free("d0")))
        urls = [stack.enter_context(_dropping(bodies)) for bodies in gone]
        s3 = stack.enter_context(ThreadServer(d3.app, ports.free("d3")))
        pool = InstancePool([Instance("colocated", url, f"colocated-{i}")
                             for i, url in enumerate((s0.url, *urls, s3.url))])
        app = build_proxy_app(pool, REQUEST_TIMEOUT_S, migration_limit=3)
        proxy = stack.enter_context(ThreadServer(app, ports.free("proxy")))
        wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see all four")
        wait_for(lambda: all(i.state == "ready" for i in pool.instances), "every instance ready")
        taken = {"colocated-0": d0.bodies, "colocated-1": gone[0], "colocated-2": gone[1], "colocated-3": d3.bodies}
        pool.policy.choose = lambda role, ready: min(  # type: ignore[method-assign]
            ready, key=lambda i: len(taken[i.name]))
        text = httpx.post(f"{proxy.url}/v1/completions", json={"prompt": "go", "max_tokens": 2, "stream": True},
                          timeout=REQUEST_TIMEOUT_S + 10).text
    assert "error" not in text and text.endswith("data: [DONE]\n\n"), text[-400:]
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert [e["choices"][0]["text"] for e in events] == ["A", "B"]
    assert [len(bodies) for bodies in gone] == [1, 1] and [b["prompt"] for b in d3.bodies] == [[1, 2, 7]]
