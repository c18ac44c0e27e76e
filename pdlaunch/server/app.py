"""The instance HTTP API: OpenAI routes plus health, info, metrics and sleep control.

Handlers never touch the engine directly: requests go through the EngineLoop (engine thread) and
their outputs come back on per-request asyncio queues, so the event loop never blocks on a step.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pdlaunch import metrics
from pdlaunch.config.models import DeploymentConfig, InstanceSpec
from pdlaunch.engine.outputs import RequestOutput
from pdlaunch.http.auth import AccessPolicy, RequireAuth
from pdlaunch.http.disconnect import CLIENT_CLOSED, ClientDisconnected, DisconnectWatch
from pdlaunch.http.errors import OpenAIError, error_body, install_error_handlers
from pdlaunch.http.limits import BodyLimit, client_request_id, read_json_object
from pdlaunch.http.sse import DONE, ClosingStreamingResponse, sse_event
from pdlaunch.server.engine_loop import Accepted, EngineLoop, RequestStream, StreamItem
from pdlaunch.server.internal import HeldKV, add_internal_routes
from pdlaunch.server.model_names import accepted_model_names, served_model_names
from pdlaunch.server.multi_serve import serve_multi
from pdlaunch.server.prompts import prompt_token_ids
from pdlaunch.server.protocol import ChatCompletionRequest, CompletionRequest, Endpoint
from pdlaunch.server.request_metrics import RequestMetrics
from pdlaunch.server.responses import ResponseBuilder
from pdlaunch.server.sleep import SleepRoutes
from pdlaunch.server.tokenize import add_tokenize_routes

KV_LAYOUT = "block-major [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]"


def served_model_name(config: DeploymentConfig) -> str:
    return served_model_names(config)[0]


def build_app(engine_loop: EngineLoop, config: DeploymentConfig, spec: InstanceSpec) -> FastAPI:
    """The FastAPI app of one instance. The lifespan starts and stops the engine thread."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine_loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine_loop.stop)

    app = FastAPI(title=f"pdlaunch {spec.name}", lifespan=lifespan)
    install_error_handlers(app)
    security = config.security  # the last middleware added runs first: no body is read before auth
    app.add_middleware(BodyLimit, max_bytes=security.max_request_bytes)
    app.add_middleware(RequireAuth, policy=AccessPolicy.from_secrets(security.api_key, security.deployment_secret))
    held_kv = HeldKV(engine_loop)
    model_name = served_model_name(config)
    metrics.set_model_name(model_name)
    accepted_names = accepted_model_names(config)
    sleep = SleepRoutes(engine_loop, config)

    def check_model(model: str | None) -> None:
        if model is not None and model not in accepted_names:
            raise OpenAIError(404, f"model {model!r} is not served here (this instance serves {model_name!r})",
                              param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> JSONResponse:
        state = "sleeping" if sleep.sleeping else engine_loop.state
        if state == "ready":
            return JSONResponse({"status": "ok", "role": spec.role, "engine_id": spec.engine_id})
        status = 500 if state == "failed" else 503
        body = error_body(status, engine_loop.error or f"instance is {state}", code=state)
        body["status"] = state
        return JSONResponse(body, status_code=status)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        engine = engine_loop.engine
        snapshot: dict[str, Any] = {}
        if engine_loop.state == "ready":
            snapshot = await engine_loop.call(_engine_snapshot)  # on the engine thread: no race with step()
        connector_info: dict[str, Any] = snapshot.get("connector", {})
        engine_id = getattr(engine, "engine_id", None) or spec.engine_id
        stats = dict(engine_loop.stats)
        return {
            "name": spec.name,
            "pid": os.getpid(),
            "role": spec.role,
            "state": "sleeping" if sleep.sleeping else engine_loop.state,
            "model": model_name,
            "engine_id": engine_id,
            "tp_size": spec.tp,
            "rank_engine_ids": snapshot.get("rank_engine_ids") or [engine_id] * spec.tp,
            "rank_nodes": snapshot.get("rank_nodes") or [spec.host] * spec.tp,
            "device": spec.device,
            "devices": spec.devices,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "transfer_mode": connector_info.get("transfer_mode", config.kv_transfer.transfer_mode)
            if spec.role != "colocated" else None,
            "kv_connector": config.kv_transfer.connector if spec.role != "colocated" else None,
            "kv_layout": connector_info.get("kv_layout") or KV_LAYOUT,
            "block_size": config.cache.block_size,
            "weight_dtype": getattr(engine, "weight_dtype", None),
            "kv_cache_dtype": getattr(engine, "kv_cache_dtype", None),
            "num_blocks_total": stats.get("num_blocks_total"),
            "num_blocks_used": stats.get("num_blocks_used"),
            "max_model_len": getattr(engine, "max_model_len", None),
            "num_pending_requests": engine_loop.num_pending,
            "num_aborted_requests": engine_loop.num_aborted,
            "stats": stats,
            "connector": connector_info,
        }

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        engine = engine_loop.engine
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": 0, "owned_by": "pdlaunch", "root": config.model.path,
            "max_model_len": getattr(engine, "max_model_len", None),
        } for name in served_model_names(config)]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = CompletionRequest.model_validate(await read_json_object(request))
        body.check_supported()
        check_model(body.model)
        if body.fans_out():  # n > 1, best_of, a list of prompts, echo
            return await serve_multi(engine_loop, body, body.prompts(), "completion", request, model_name,
                                     sleep.sleeping)
        return await _serve(body, body.single_prompt(), "completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = ChatCompletionRequest.model_validate(await read_json_object(request))
        body.check_supported()
        check_model(body.model)
        if body.fans_out():  # n > 1
            return await serve_multi(engine_loop, body, [body.template_messages()], "chat", request, model_name,
                                     sleep.sleeping)
        return await _serve(body, body.template_messages(), "chat", request)

    async def _serve(body: CompletionRequest | ChatCompletionRequest, prompt: Any,
                     endpoint: Endpoint, request: Request) -> Response:
        if sleep.sleeping:
            raise OpenAIError(503, "instance is sleeping; POST /wake_up first", code="sleeping")
        arrival = time.monotonic()
        params = body.sampling_params()
        # The client's X-Request-Id names the response; the engine id gets a suffix so that a reused
        # header (or a prefill id still holding KV for its decode leg) never collides inside the engine.
        client_id = client_request_id(request.headers.get("x-request-id"), uuid.uuid4().hex)
        request_id = f"{client_id}-{uuid.uuid4().hex[:8]}"
        recorder = RequestMetrics(request_id, endpoint, arrival, n=body.n, max_tokens=params.max_tokens)
        if engine_loop.state != "ready":
            raise OpenAIError(503, f"engine is not ready (state: {engine_loop.state})", code="not_ready")
        engine = engine_loop.engine
        prompt_ids = await prompt_token_ids(engine.tokenizer, prompt, engine.max_model_len)
        stream = engine_loop.submit(request_id, prompt_ids, params, body.kv_transfer_params)
        remote_decode = bool((body.kv_transfer_params or {}).get("do_remote_decode"))

        def client_gone() -> Response:
            engine_loop.abort(request_id)  # a no-op once the engine finished the request
            if remote_decode:  # finished already, the KV is held for a decode leg that will not come
                held_kv.release_soon(request_id)  # queued after the abort: frees only what is held
            return Response(status_code=CLIENT_CLOSED)

        try:
            with DisconnectWatch(request) as watch:
                first = await watch.run(stream.queue.get())
                if not isinstance(first, Accepted):
                    _raise_if_error(first)
                    raise OpenAIError(500, f"engine answered {type(first).__name__} before accepting the request")
                recorder.accepted(first.num_prompt_tokens)
                builder = ResponseBuilder(
                    endpoint=endpoint, model=model_name, num_prompt_tokens=first.num_prompt_tokens,
                    return_token_ids=body.return_token_ids,
                    prompt_token_ids=prompt_ids if body.return_token_ids else None,
                    tool_calling=body.tool_calling() if isinstance(body, ChatCompletionRequest) else None,
                    response_id=("cmpl-" if endpoint == "completion" else "chatcmpl-") + client_id,
                    detokenize=lambda token_id: engine_loop.engine.tokenizer.decode([token_id]),
                )
                headers = {"X-Request-Id": client_id}
                if body.stream:
                    async def abort() -> None:  # no-op once finished; frees the blocks if the client left
                        engine_loop.abort(request_id)

                    return ClosingStreamingResponse(
                        _stream(stream, builder, recorder, body.include_usage()), on_close=abort,
                        headers={**headers, "Cache-Control": "no-cache"})
                result = await watch.run(_collect(stream, builder, recorder))
                if watch.gone:
                    return client_gone()
                return JSONResponse(result, headers=headers)
        except ClientDisconnected:
            return client_gone()
        except BaseException:
            engine_loop.abort(request_id)
            raise

    async def _collect(stream: RequestStream, builder: ResponseBuilder, recorder: RequestMetrics) -> dict[str, Any]:
        while True:
            out = _raise_if_error(await stream.queue.get())
            builder.add(out)
            recorder.output(out)
            if out.finished:
                return builder.response()

    async def _stream(stream: RequestStream, builder: ResponseBuilder, recorder: RequestMetrics,
                      include_usage: bool) -> AsyncIterator[bytes]:
        try:
            while True:
                item = await stream.queue.get()
                try:
                    out = _raise_if_error(item)
                except OpenAIError as exc:
                    yield sse_event(exc.body())
                    return
                recorder.output(out)
                chunk = builder.chunk(out, final_usage=not include_usage)
                if chunk is not None:
                    yield sse_event(chunk)
                if out.finished:
                    break
            if include_usage:
                yield sse_event(builder.usage_chunk())
            yield DONE
        finally:
            engine_loop.abort(stream.request_id)  # no-op once finished; frees blocks if the client left

    sleep.add_routes(app)
    add_tokenize_routes(app, engine_loop, check_model)
    add_internal_routes(app, held_kv)
    return app


def _engine_snapshot(engine: Any) -> dict[str, Any]:
    """What /info reads from the engine itself (runs on the engine thread)."""
    ids = getattr(engine, "rank_engine_ids", None)
    ids = ids() if callable(ids) else ids
    connector = getattr(engine, "connector", None)
    nodes = getattr(engine, "rank_nodes", None)
    return {"rank_engine_ids": list(ids) if ids else None, "rank_nodes": nodes() if callable(nodes) else None,
            "connector": connector.info() if connector is not None else {}}


def _raise_if_error(item: StreamItem) -> RequestOutput:
    if isinstance(item, OpenAIError):
        raise item
    if not isinstance(item, RequestOutput):
        raise OpenAIError(500, f"unexpected {type(item).__name__} on a request's output queue")
    if item.finished and item.finish_reason == "error":
        raise OpenAIError(item.error_status, item.error or "the engine failed the request", code="engine_error")
    return item
