"""`/sleep`, `/wake_up`, `/is_sleeping` at the proxy: fanned out to every instance (docs/ARCHITECTURE.md "CuMem
and sleep"). RequireAuth has already checked the caller's API key (http/auth.py); the calls to the
instances carry the internal token."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pdlaunch.http.errors import error_body
from pdlaunch.proxy.instances import Instance, InstancePool


def add_control_routes(app: FastAPI, pool: InstancePool, client: Any, headers: dict[str, str],
                       timeout_s: float) -> None:
    """`client()` returns the proxy's httpx.AsyncClient (it exists only while the app runs)."""

    async def one(method: str, path: str, request: Request, instance: Instance) -> dict[str, Any]:
        try:
            response = await client().request(method, instance.url + path, params=request.query_params,
                                              headers=headers, timeout=timeout_s)
            content = response.json() if response.content else {}
            return {"name": instance.name, "status": response.status_code, "body": content}
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            return {"name": instance.name, "status": 502, "body": error_body(502, f"{type(exc).__name__}: {exc}")}

    async def fan_out(method: str, path: str, request: Request) -> JSONResponse:
        results = await asyncio.gather(*(one(method, path, request, i) for i in pool.instances))
        failed = [r for r in results if r["status"] != 200]
        if not failed:
            return JSONResponse({"instances": results})
        first = failed[0]
        inner = first["body"].get("error") if isinstance(first["body"], dict) else None
        inner = inner if isinstance(inner, dict) else {}
        status = first["status"] if first["status"] < 500 or first["status"] == 503 else 502
        body = error_body(status, f"{first['name']}: {inner.get('message', 'failed')}",
                          param=inner.get("param"), code=inner.get("code"))
        body["instances"] = results
        return JSONResponse(body, status_code=status)

    @app.post("/sleep")
    async def sleep(request: Request) -> JSONResponse:
        return await fan_out("POST", "/sleep", request)

    @app.post("/wake_up")
    async def wake_up(request: Request) -> JSONResponse:
        return await fan_out("POST", "/wake_up", request)

    @app.get("/is_sleeping")
    async def is_sleeping(request: Request) -> JSONResponse:
        return await fan_out("GET", "/is_sleeping", request)
