"""`/tokenize`, `/detokenize` and `/version` at the proxy (server/tokenize.py has the instance side).

Every instance of a deployment serves the same checkpoint and tokenizer, so /tokenize and /detokenize go
to one ready instance (of the role /v1/models asks, retried once on another when it is gone: retry.py) and
its answer, a 4xx naming the field included, is relayed as it is. /version answers here (the same
version as every instance: one package). RequireAuth has
already checked the caller's API key (http/auth.py); the call to the instance carries the internal token.
"""

from __future__ import annotations

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response

import pdlaunch
from pdlaunch.proxy.instances import Instance
from pdlaunch.proxy.retry import on_live_instance
from pdlaunch.proxy.upstream import CONNECT_TIMEOUT_S, Proxy


def add_tokenize_routes(app: FastAPI, proxy: Proxy) -> None:
    pool = proxy.pool

    async def relay(path: str, request: Request) -> Response:
        raw = await request.body()
        headers = {"Content-Type": "application/json", **proxy.upstream_headers}
        if not proxy.upstream_headers and "authorization" in request.headers:  # foreign instances with a key
            headers["Authorization"] = request.headers["authorization"]

        async def ask(instance: Instance) -> httpx.Response:
            try:
                return await proxy.http().post(instance.url + path, content=raw, headers=headers,
                                               timeout=httpx.Timeout(proxy.request_timeout_s,
                                                                     connect=CONNECT_TIMEOUT_S))
            except httpx.HTTPError as exc:
                raise proxy.failed(instance, exc) from None

        role = pool.required_roles()[-1]
        _, answer = await on_live_instance(pool, role, pool.pick(role), ask)
        return Response(answer.content, status_code=answer.status_code, media_type="application/json")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await relay("/tokenize", request)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await relay("/detokenize", request)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": pdlaunch.__version__}
