"""The OpenAI-compatible PD proxy: prefill leg, then decode leg streamed through (DESIGN.md "Request flow").

Every upstream call runs under the request's deadline (proxy.request_timeout_seconds); a failed or
vanished instance becomes an OpenAI-format 502/503/504 (mid-stream: an SSE error event), never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pdlaunch.config.models import SecurityConfig
from pdlaunch.proxy.control import add_control_routes
from pdlaunch.proxy.federate import instance_metrics
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.metrics import CountRequests, ProxyMetrics
from pdlaunch.proxy.release import KVReleaser
from pdlaunch.proxy.retry import on_live_instance
from pdlaunch.proxy.translate import (
    decode_body,
    error_from_exception,
    error_from_response,
    is_connection_failure,
    kv_params_of,
    parse_client_body,
    prefill_body,
)
from pdlaunch.server.auth import AccessPolicy, RequireAuth, internal_headers
from pdlaunch.server.errors import OpenAIError, error_body, install_error_handlers
from pdlaunch.server.limits import PARSE_INLINE_BYTES, BodyLimit, client_request_id
from pdlaunch.server.sse import ClosingStreamingResponse, SSEParser, sse_event

log = logging.getLogger("pdlaunch.proxy")

CONNECT_TIMEOUT_S = 5.0
CLIENT_CLOSED = 499


@dataclass
class Upstream:
    """An open streaming answer of an instance; holds one in-flight count until closed."""

    instance: Instance
    response: httpx.Response
    closed: bool = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.instance.in_flight -= 1
        await self.response.aclose()


class Proxy:
    """Routes client requests to instances. One per proxy process; the app's lifespan owns the client."""

    def __init__(self, pool: InstancePool, request_timeout_s: float, deployment_secret: str | None = None) -> None:
        self.pool = pool
        self.request_timeout_s = request_timeout_s
        self.metrics = ProxyMetrics(pool)
        self.client: httpx.AsyncClient | None = None
        # Every call to an instance carries the internal token: instances with an API key accept it.
        self.upstream_headers = internal_headers(deployment_secret)
        self.kv = KVReleaser(self.upstream_headers)

    def http(self) -> httpx.AsyncClient:
        if self.client is None:
            raise OpenAIError(503, "proxy is not started", code="not_ready")
        return self.client

    def _timeout(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OpenAIError(504, f"request timed out after {self.request_timeout_s:g}s at the proxy "
                                   "(proxy.request_timeout_seconds)", code="timeout")
        return remaining

    def failed(self, instance: Instance, exc: BaseException) -> OpenAIError:
        if is_connection_failure(exc):
            self.pool.mark_down(instance, f"{type(exc).__name__} during a request")
        return error_from_exception(instance, exc, self.request_timeout_s)

    async def post_json(self, instance: Instance, path: str, body: dict[str, Any], headers: dict[str, str],
                        deadline: float) -> dict[str, Any]:
        remaining = self._timeout(deadline)
        with instance.lease():
            try:
                response = await asyncio.wait_for(self.http().post(
                    instance.url + path, json=body, headers=headers,
                    timeout=httpx.Timeout(remaining, connect=min(CONNECT_TIMEOUT_S, remaining))), remaining)
            except (httpx.HTTPError, TimeoutError) as exc:
                raise self.failed(instance, exc) from None
        if response.status_code != 200:
            raise error_from_response(instance, response.status_code, response.content)
        try:
            return response.json()
        except ValueError:
            raise OpenAIError(502, f"{instance.name} ({instance.url}) answered 200 with a body that is not JSON",
                              code="instance_failed") from None

    async def open_stream(self, instance: Instance, path: str, body: dict[str, Any], headers: dict[str, str],
                          deadline: float) -> Upstream:
        """Send a streaming request; on success the caller must close the returned Upstream."""
        remaining = self._timeout(deadline)
        client = self.http()
        request = client.build_request("POST", instance.url + path, json=body, headers=headers, timeout=httpx.Timeout(
            remaining, connect=min(CONNECT_TIMEOUT_S, remaining)))
        instance.in_flight += 1
        try:
            response = await asyncio.wait_for(client.send(request, stream=True), remaining)
        except (httpx.HTTPError, TimeoutError) as exc:
            instance.in_flight -= 1
            raise self.failed(instance, exc) from None
        if response.status_code != 200:
            try:
                content = await response.aread()
            except httpx.HTTPError:
                content = b""
            await response.aclose()
            instance.in_flight -= 1
            raise error_from_response(instance, response.status_code, content)
        return Upstream(instance, response)

    async def relay(self, upstream: Upstream, deadline: float) -> AsyncIterator[bytes]:
        """Pass SSE events through one by one; end with an error event if the instance fails."""
        instance, response = upstream.instance, upstream.response
        parser = SSEParser()
        finished = False
        try:
            chunks = response.aiter_raw()
            while True:
                remaining = self._timeout(deadline)
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), remaining)
                except StopAsyncIteration:
                    break
                for data in parser.feed(chunk):
                    if data == "[DONE]" or data.startswith('{"error"'):
                        finished = True
                    yield b"data: " + data.encode() + b"\n\n"
            if not finished:
                yield sse_event(error_body(502, f"{instance.name} ({instance.url}) closed the stream before it "
                                                "finished", code="instance_failed"))
        except OpenAIError as exc:
            yield sse_event(exc.body())
        except (httpx.HTTPError, TimeoutError) as exc:
            yield sse_event(self.failed(instance, exc).body())
        finally:
            await upstream.close()


def build_proxy_app(pool: InstancePool, request_timeout_s: float, api_key: str | None = None,
                    deployment_secret: str | None = None,
                    max_request_bytes: int = SecurityConfig().max_request_bytes) -> FastAPI:
    """The proxy app. Access as at the instances (server/auth.py): `api_key` for clients, the internal
    token derived from `deployment_secret` towards the instances."""
    proxy = Proxy(pool, request_timeout_s, deployment_secret)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=2048, max_keepalive_connections=256)
        async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
            proxy.client = proxy.kv.client = client
            await pool.check_all(client)
            pool.start_monitor(client)
            try:
                yield
            finally:
                await pool.stop_monitor()
                await proxy.kv.drain()
                proxy.client = proxy.kv.client = None

    app = FastAPI(title="pdlaunch proxy", lifespan=lifespan)
    app.state.proxy = proxy
    install_error_handlers(app)

    # Outermost first: count every answer, then authenticate, then bound the body.
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_middleware(RequireAuth, policy=AccessPolicy.from_secrets(api_key, deployment_secret))
    app.add_middleware(CountRequests, counter=proxy.metrics.requests, router=app.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = pool.ready()
        body = {"status": "ok" if ok else "unavailable", "pid": os.getpid(),
                "instances": [i.as_dict() for i in pool.instances]}
        if not ok:
            missing = [r for r in pool.required_roles()
                       if not any(i.role == r and i.state == "ready" for i in pool.instances)]
            body.update(error_body(503, f"no ready {' / '.join(missing)} instance"))
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/instances")
    async def instances() -> list[dict[str, object]]:
        return [i.as_dict() for i in pool.instances]

    @app.get("/metrics")
    async def metrics() -> Response:
        federated, missed = await instance_metrics(proxy.http(), pool, proxy.upstream_headers)
        proxy.metrics.federation_errors.inc(missed)
        return Response(generate_latest(proxy.metrics.registry) + federated, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        instance = pool.pick(pool.required_roles()[-1])
        try:
            response = await proxy.http().get(instance.url + "/v1/models", headers=proxy.upstream_headers,
                                              timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise proxy.failed(instance, exc) from None
        return Response(response.content, status_code=response.status_code, media_type="application/json")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _route(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _route(request, "/v1/chat/completions", chat=True)

    async def _route(request: Request, path: str, chat: bool) -> Response:
        raw = await request.body()
        body = parse_client_body(raw, chat) if len(raw) <= PARSE_INLINE_BYTES else \
            await asyncio.to_thread(parse_client_body, raw, chat)  # the event loop serves every stream
        request_id = client_request_id(request.headers.get("x-request-id"), f"pd-{uuid.uuid4().hex}")
        headers = {"X-Request-Id": request_id, **proxy.upstream_headers}
        if not proxy.upstream_headers and "authorization" in request.headers:  # foreign instances with a key
            headers["Authorization"] = request.headers["authorization"]
        deadline = time.monotonic() + request_timeout_s
        watch = asyncio.ensure_future(_wait_disconnect(request))
        held: tuple[Instance, dict[str, Any]] | None = None  # a prefill's KV waiting for our decode leg

        def release_held() -> None:
            if held is not None:
                proxy.kv.release_soon(*held)

        legs: list[str] = []  # instances that served this request, for the DEBUG line
        outcome = "error"
        try:
            if pool.colocated:
                target, leg = pool.pick("colocated"), body
            else:
                # Both picked up front: no prefill work (and no held KV) when no decode instance is up.
                target, first_prefill = pool.pick("decode"), pool.pick("prefill")
                prefill_leg = prefill_body(body, chat)
                started = time.monotonic()
                done, result = await _race(on_live_instance(
                    pool, "prefill", first_prefill,
                    lambda p: proxy.post_json(p, path, prefill_leg, headers, deadline)), watch)
                if not done:
                    outcome = "client closed"
                    return Response(status_code=CLIENT_CLOSED)
                prefill, answer = result
                legs.append(prefill.name)
                proxy.metrics.prefill_seconds.observe(time.monotonic() - started)
                held = (prefill, kv_params_of(prefill, answer))
                leg = decode_body(body, held[1])
            role = target.role
            if body.get("stream"):
                done, result = await _race(on_live_instance(
                    pool, role, target, lambda d: proxy.open_stream(d, path, leg, headers, deadline)), watch)
                if not done:
                    release_held()
                    outcome = "client closed"
                    return Response(status_code=CLIENT_CLOSED)
                upstream = result[1]
                legs.append(upstream.instance.name)
                outcome = "streaming"
                return ClosingStreamingResponse(proxy.relay(upstream, deadline), on_close=upstream.close,
                                                headers={"X-Request-Id": request_id, "Cache-Control": "no-cache"})
            done, result = await _race(on_live_instance(
                pool, role, target, lambda d: proxy.post_json(d, path, leg, headers, deadline)), watch)
            if not done:
                release_held()
                outcome = "client closed"
                return Response(status_code=CLIENT_CLOSED)
            legs.append(result[0].name)
            outcome = "ok"
            return JSONResponse(result[1], headers={"X-Request-Id": request_id})
        except OpenAIError as exc:
            release_held()  # the decode refused the request, failed, or could not be reached
            outcome = f"error {exc.status}"
            raise
        finally:
            watch.cancel()
            log.debug("request %s %s via %s: %s", request_id, path, " -> ".join(legs) or "no instance", outcome)

    add_control_routes(app, pool, proxy.http, proxy.upstream_headers, request_timeout_s)
    return app


async def _wait_disconnect(request: Request) -> None:
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


async def _race(work: Any, watch: "asyncio.Future[None]") -> tuple[bool, Any]:
    """(True, result of work), or (False, None) when the client went away first (work is cancelled)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return True, task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - cancelled or failed: the client is gone either way
        pass
    return False, None
