"""An instance that answers 200 with an empty body is named in the proxy's 502 as the one at fault: the words
parse_json_object gives a client that sent an empty body ("send a JSON object ...") must not reach the client as if
it were the one to fix something."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.limits import body_problem, parse_json_object
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.serving.helpers import ThreadServer, wait_for


def _silent_prefill() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> Any:
        return JSONResponse({"status": "ok"})

    @app.post("/v1/completions")
    async def completions() -> Any:
        return Response(b"", status_code=200, media_type="application/json")

    return app


def test_an_instances_empty_200_is_its_fault_in_the_502() -> None:
    ports = PortAllocator("127.0.0.1")
    with ThreadServer(_silent_prefill(), ports.free("p")) as p, ThreadServer(_silent_prefill(), ports.free("d")) as d:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d.url, "decode-0")])
        with ThreadServer(build_proxy_app(pool, 5.0), ports.free("proxy")) as srv:
            wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 200, "the proxy to see both instances")
            answer = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert answer.status_code == 502, answer.text
    message = answer.json()["error"]["message"]
    assert "prefill-0" in message and "body is empty" in message, message
    assert "send a JSON object" not in message, message


def test_body_problem_keeps_what_is_wrong_and_drops_the_clients_advice() -> None:
    for raw, said in [(b"", "body is empty"), (b"[1]", "body must be a JSON object, got a list")]:
        try:
            parse_json_object(raw)
        except OpenAIError as exc:
            assert body_problem(exc).startswith(said) and "send" not in body_problem(exc)
        else:
            raise AssertionError(f"{raw!r} parsed")
