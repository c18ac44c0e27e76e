"""The OpenAI-compatible PD proxy: prefill leg, then decode leg streamed through (docs/ARCHITECTURE.md "Request flow").

The prefill leg asks for its sampled token in the signed answer (when the request allows it:
translate.continues_from_first_token); the decode hands that token to the client at admission and
continues from it (engine/first_token.py), so the client's first token does not wait for the KV
transfer. A token that ends the request (or max_tokens 1) ends it at the prefill's answer.

The calls to instances (deadlines, errors, relaying a stream) live in upstream.py; a leg refused by a
dead instance is retried once on another (retry.py), a prefill leg that outlives its deadline (a stalled
prefill) likewise, else the decode computes the prompt (prefill_leg.py); /metrics adds every instance's
series (federate.py).
A list of prompts in /v1/completions becomes one PD request per prompt, merged (prompt_lists.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pdlaunch.config.models import SecurityConfig
from pdlaunch.http.auth import AccessPolicy, RequireAuth
from pdlaunch.http.disconnect import CLIENT_CLOSED, ClientDisconnected, DisconnectWatch
from pdlaunch.http.errors import OpenAIError, error_body, install_error_handlers
from pdlaunch.http.limits import PARSE_INLINE_BYTES, BodyLimit, client_request_id
from pdlaunch.http.sse import ClosingStreamingResponse
from pdlaunch.proxy.control import add_control_routes
from pdlaunch.proxy.disaggregate import DECODE_ONLY, Disaggregation
from pdlaunch.proxy.federate import instance_metrics
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.metrics import CountRequests
from pdlaunch.proxy.migrate import DEFAULT_MIGRATION_LIMIT, Migrations
from pdlaunch.proxy.prefill_leg import PrefillDeadline, PrefillLegs, prompt_chars
from pdlaunch.proxy.prompt_lists import MergedStream, gather_legs, merge_answers, split_prompts
from pdlaunch.proxy.retry import on_live_instance
from pdlaunch.proxy.tokenize import add_tokenize_routes
from pdlaunch.proxy.translate import (
    client_limit_error,
    continues_from_first_token,
    decode_body,
    ended_by_first_token,
    kv_params_of,
    parse_client_body,
    prefill_body,
    refuse_in_pd,
    with_prompt_logprobs,
)
from pdlaunch.proxy.upstream import CONNECT_TIMEOUT_S, Proxy, Upstream

log = logging.getLogger("pdlaunch.proxy")


def build_proxy_app(pool: InstancePool, request_timeout_s: float, api_key: str | None = None,
                    deployment_secret: str | None = None,
                    max_request_bytes: int = SecurityConfig().max_request_bytes,
                    prefill_timeout_s: float | None = None, load_failure_policy: str = "recompute",
                    migration_limit: int = DEFAULT_MIGRATION_LIMIT,
                    disaggregation: Disaggregation | None = None) -> FastAPI:
    """The proxy app. Access as at the instances (http/auth.py): `api_key` for clients, the internal
    token derived from `deployment_secret` towards the instances. The prefill leg runs under its own
    deadline (`prefill_timeout_s`, None: derived; prefill_leg.py); a decode leg whose instance dies or
    stalls goes on on another decode, at most `migration_limit` times (migrate.py); `disaggregation`
    sends short prompts to a decode alone (disaggregate.py; None: every request is PD)."""
    if load_failure_policy not in ("recompute", "fail"):
        raise ValueError(f"load_failure_policy {load_failure_policy!r}: choose recompute or fail")
    proxy = Proxy(pool, request_timeout_s, deployment_secret)
    prefill_legs = PrefillLegs(proxy, PrefillDeadline(prefill_timeout_s), recompute=load_failure_policy == "recompute")
    disaggregation = disaggregation or Disaggregation(None, None)
    migrations = Migrations(proxy, migration_limit, on_migrate=lambda why: proxy.metrics.migrations.labels(why).inc(),
                            on_exhausted=proxy.metrics.migrations_exhausted.inc)

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
        async def ask(instance: Instance) -> httpx.Response:
            try:
                return await proxy.http().get(instance.url + "/v1/models", headers=proxy.upstream_headers,
                                              timeout=CONNECT_TIMEOUT_S)
            except httpx.HTTPError as exc:
                raise proxy.failed(instance, exc) from None

        role = pool.required_roles()[-1]
        _, response = await on_live_instance(pool, role, pool.pick(role), ask)
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
        with DisconnectWatch(request) as watch:
            if not pool.colocated:
                refuse_in_pd(body, chat)
            parts = None if chat or pool.colocated else split_prompts(body)
            if parts is None:
                return await _serve_one(path, chat, body, request_id, headers, deadline, watch)
            return await _serve_prompts(path, parts, body, request_id, headers, deadline, watch)

    async def _serve_prompts(path: str, parts: list[dict[str, Any]], body: dict[str, Any], request_id: str,
                             headers: dict[str, str], deadline: float, watch: DisconnectWatch) -> Response:
        """A list of prompts in PD: one PD request per prompt, concurrently, merged (prompt_lists.py)."""
        n, response_id = body.get("n") or 1, f"cmpl-{request_id}"
        calls = [_serve_one(path, False, part, f"{request_id}-{p}", {**headers, "X-Request-Id": f"{request_id}-{p}"},
                            deadline, watch) for p, part in enumerate(parts)]
        answers = await gather_legs(calls, _close_streams)
        if any(a.status_code == CLIENT_CLOSED for a in answers):
            await _close_streams(answers)
            return Response(status_code=CLIENT_CLOSED)
        if body.get("stream"):
            streams = [a for a in answers if isinstance(a, ClosingStreamingResponse)]
            if len(streams) != len(answers):
                await _close_streams(answers)
                raise OpenAIError(502, "an instance answered a streamed prompt without a stream",
                                  code="instance_failed")
            merged = MergedStream(streams, n, response_id)
            return ClosingStreamingResponse(merged.events(), on_close=merged.close,
                                            headers={"X-Request-Id": request_id, "Cache-Control": "no-cache"})
        return JSONResponse(merge_answers([json.loads(bytes(a.body)) for a in answers], n, response_id),
                            headers={"X-Request-Id": request_id})

    async def _serve_one(path: str, chat: bool, body: dict[str, Any], request_id: str, headers: dict[str, str],
                         deadline: float, watch: DisconnectWatch) -> Response:
        held: tuple[Instance, dict[str, Any]] | None = None  # a prefill's KV waiting for our decode leg
        prefill_answer: Any = None

        def release_held() -> None:
            if held is not None:
                proxy.kv.release_soon(*held)

        legs: list[str] = []  # instances that served this request, for the DEBUG line
        outcome = "error"
        try:
            if pool.colocated:
                target, leg = pool.pick("colocated"), body
            else:
                # The decode is picked first: no prefill work (and no held KV) when no decode instance is up.
                target = pool.pick("decode")
                decision, prompt_tokens = await disaggregation.decide(body, chat)
                if disaggregation.min_tokens is not None:
                    proxy.metrics.disaggregation.labels(decision).inc()
                    legs.append(f"{decision} ({prompt_tokens} prompt tokens, "
                                f"disaggregate_min_tokens {disaggregation.min_tokens})")
                first_token = continues_from_first_token(body)
                answered = None
                if decision != DECODE_ONLY:
                    first_prefill = pool.pick("prefill")
                    prefill_leg = prefill_body(body, chat, first_token)
                    started = time.monotonic()
                    try:
                        answered = await watch.run(prefill_legs.run(first_prefill, path, prefill_leg, headers,
                                                                    deadline, prompt_chars(body)))
                    except OpenAIError as exc:
                        raise client_limit_error(exc, body, chat) from None
                if answered is None:  # a short prompt, or no prefill answered in time: the decode computes it
                    if decision != DECODE_ONLY:
                        legs.append("no prefill (stalled)")
                    leg = {k: v for k, v in body.items() if k != "kv_transfer_params"}
                else:
                    prefill, prefill_answer = answered
                    legs.append(prefill.name)
                    proxy.metrics.prefill_seconds.observe(time.monotonic() - started)
                    held = (prefill, kv_params_of(prefill, prefill_answer))
                    leg = decode_body(body, held[1])
                if prefill_answer is not None and first_token and ended_by_first_token(body, chat, prefill_answer):
                    # Its one token is the whole answer: the decode ends at admission without loading, so
                    # the prefill's KV goes back now rather than at the end of its lease. The decode leg
                    # still runs: it applies the request's own limits (prompt + max_tokens against
                    # max_model_len) that the prefill's one-token leg never saw, as colocated would.
                    release_held()
                    held = None
            role = target.role
            if body.get("stream"):
                migrating = migrations.streams(body, chat)
                if migrating:  # the ids to continue from when this decode fails (migrate.py)
                    leg = {**leg, "return_token_ids": True}
                _, upstream = await watch.run(on_live_instance(
                    pool, role, target, lambda d: proxy.open_stream(d, path, leg, headers, deadline)))
                legs.append(upstream.instance.name)
                outcome = "streaming"
                events = migrations.relay(upstream, path, body, chat, headers, deadline, request_id,
                                          release_held) if migrating else proxy.relay(upstream, deadline)
                return _relayed(upstream, events, request_id, release_held)
            decode, answer = await watch.run(migrations.answer(target, path, leg, body, headers, deadline,
                                                               request_id))
            legs.append(decode.name)
            outcome = "ok"
            if prefill_answer is not None and body.get("prompt_logprobs") is not None:
                answer = with_prompt_logprobs(answer, prefill_answer, chat)
            return JSONResponse(answer, headers={"X-Request-Id": request_id})
        except ClientDisconnected:
            release_held()
            outcome = "client closed"
            return Response(status_code=CLIENT_CLOSED)
        except OpenAIError as exc:
            release_held()  # the decode refused the request, failed, or could not be reached
            outcome = f"error {exc.status}"
            raise
        except asyncio.CancelledError:
            release_held()  # another prompt of the same request failed
            outcome = "cancelled"
            raise
        finally:
            log.debug("request %s %s via %s: %s", request_id, path, " -> ".join(legs) or "no instance", outcome)

    def _relayed(upstream: Upstream, events: AsyncGenerator[bytes, None], request_id: str,
                 release_held: Callable[[], None]) -> ClosingStreamingResponse:
        """The decode's stream (`events`) passed through to the client."""
        relayed_all = False

        async def relay() -> AsyncIterator[bytes]:
            nonlocal relayed_all
            async for chunk in events:
                yield chunk
            relayed_all = True

        async def close() -> None:
            await events.aclose()  # its own finally closes a migrated stream's current upstream
            await upstream.close()
            if not relayed_all:
                # The client left mid-stream (the decode streams the first token before the KV
                # arrives): the decode may never read the prefill's KV, so it goes back now.
                release_held()

        return ClosingStreamingResponse(relay(), on_close=close,
                                        headers={"X-Request-Id": request_id, "Cache-Control": "no-cache"})

    add_control_routes(app, pool, proxy.http, proxy.upstream_headers, request_timeout_s)
    add_tokenize_routes(app, proxy)
    return app


async def _close_streams(answers: list[Response]) -> None:
    for answer in answers:
        if isinstance(answer, ClosingStreamingResponse):
            await answer.close()
