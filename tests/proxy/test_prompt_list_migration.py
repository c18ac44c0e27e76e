"""A streamed /v1/completions with a list of prompts in front of colocated instances goes to one instance whole (it
is split only through PD: prompt_lists.py), and its stream carries one choice per prompt. A continuation goes on
from one prompt's ids + one choice's output ids, so such a stream is not continued mid-stream, as `n` > 1 is not:
its stream ends with the error event naming `prompt`. Before, the proxy continued it from the ids of every choice
strung together after one prompt's ids: another instance was sent that mixed prompt and its text was streamed to
the client as choice 0's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.continuation import not_migratable
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.serving.helpers import ThreadServer, wait_for


class DyingColocated:
    """Streams the first token of each prompt (its choice's prompt ids with it, as an instance does when asked for
    token ids), then ends the stream without [DONE]: it died. Records every request."""

    def __init__(self, bodies: list[dict[str, Any]]) -> None:
        self.bodies = bodies
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.post("/v1/completions")(self.completions)

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        self.bodies.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        chunks = [{"id": "cmpl-c", "object": "text_completion", "created": 1, "model": "m",
                   "choices": [{"index": p, "text": f"p{p}", "finish_reason": None, "token_ids": [50 + p],
                                "prompt_token_ids": [10 + p, 20 + p]}]} for p in range(len(prompts))]

        async def events() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")


def test_a_list_of_prompts_does_not_migrate() -> None:
    assert not_migratable({"prompt": ["one", "two"]}, chat=False) == "prompt"
    assert not_migratable({"prompt": [[1, 2], [3]]}, chat=False) == "prompt"
    for one in ("one", ["one"], [1, 2, 3], [[1, 2, 3]]):  # one prompt, however written
        assert not_migratable({"prompt": one}, chat=False) is None


@pytest.mark.parametrize("prompt", [["first", "second"], [[1, 2], [3, 4]]], ids=["strings", "token-id-lists"])
def test_a_streamed_list_of_prompts_on_a_colocated_instance_that_dies_is_not_continued(prompt: list[Any]) -> None:
    ports, bodies = PortAllocator("127.0.0.1"), []
    with ThreadServer(DyingColocated(bodies).app, ports.free("c0")) as c0, \
            ThreadServer(DyingColocated(bodies).app, ports.free("c1")) as c1:
        pool = InstancePool([Instance("colocated", c0.url, "colocated-0"), Instance("colocated", c1.url,
                                                                                    "colocated-1")])
        app = build_proxy_app(pool, 60.0, migration_limit=3)
        with ThreadServer(app, ports.free("proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see both instances")
            text = httpx.post(f"{proxy.url}/v1/completions", json={"prompt": prompt, "max_tokens": 8, "stream": True},
                              timeout=30).text
    assert len(bodies) == 1, f"the stream was continued on the other instance with {bodies[1:]}"
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert [(c["index"], c["text"]) for e in events[:-1] for c in e["choices"]] == [(0, "p0"), (1, "p1")], text
    error = events[-1]["error"]
    assert error["code"] == "instance_failed" and "`prompt` field" in error["message"], error
    assert text.endswith("data: [DONE]\n\n")
