"""`GET /health`, `/info`, `/metrics` and `/v1/models`: what an instance says about itself."""

from __future__ import annotations

import os
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pdlaunch.http import JsonObject, JsonValue
from pdlaunch.http.errors import error_body
from pdlaunch.server.instance import Handler, instance_of, served_model_names

KV_LAYOUT = "block-major [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]"


async def health(request: Request) -> JSONResponse:
    instance = instance_of(request)
    state, spec = instance.state, instance.spec
    if state == "ready":
        # itl_ms: the mean time between streamed tokens over the last second (0 when idle), for the proxy's
        # proxy.disaggregate_max_itl_ms. kv_capacity: what the KV cache holds of one request, which the proxy passes
        # to a prefill leg so that the prefill refuses what this decode would (engine/kv_capacity.py).
        body: JsonObject = {"status": "ok", "role": spec.role, "engine_id": spec.engine_id,
                            "itl_ms": round(instance.engine_loop.recent_itl.ms(), 3)}
        engine = instance.engine_loop.built_engine
        if engine is not None:
            body["kv_capacity"] = dict[str, JsonValue](engine.kv_capacity.model_dump())
        return JSONResponse(body)
    status = 500 if state == "failed" else 503
    body = error_body(status, instance.engine_loop.error or f"instance is {state}", code=state)
    body["status"] = state
    return JSONResponse(body, status_code=status)


async def info(request: Request) -> JsonObject:
    """What the instance is, from what the engine thread last recorded (engine_thread.py): answered at once, also
    while a step, a sleep or a wake_up holds that thread; `sleep_transition` says when one of those two runs."""
    instance = instance_of(request)
    engine_loop, spec, config = instance.engine_loop, instance.spec, instance.config
    engine = engine_loop.built_engine
    connector_info = engine_loop.connector_info
    engine_id = engine.engine_id if engine is not None else spec.engine_id
    stats = engine_loop.stats
    pd = spec.role != "colocated"
    return {
        "name": spec.name,
        "pid": os.getpid(),
        "role": spec.role,
        "state": instance.state,
        "sleep_transition": instance.sleep_transition,
        "model": instance.model_name,
        "engine_id": engine_id,
        "tp_size": spec.tp,
        "rank_engine_ids": list[JsonValue](engine_loop.rank_engine_ids or [engine_id] * spec.tp),
        "rank_nodes": list[JsonValue](engine_loop.rank_nodes or [spec.host] * spec.tp),
        "device": spec.device,
        "devices": list[JsonValue](spec.devices),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "transfer_mode": connector_info.get("transfer_mode", config.kv_transfer.transfer_mode) if pd else None,
        "kv_connector": config.kv_transfer.connector if pd else None,
        "kv_layout": connector_info.get("kv_layout") or KV_LAYOUT,
        "block_size": config.cache.block_size,
        "weight_dtype": engine.weight_dtype if engine is not None else None,
        "kv_cache_dtype": engine.kv_cache_dtype if engine is not None else None,
        "num_blocks_total": stats["num_blocks_total"] if stats is not None else None,
        "num_blocks_used": stats["num_blocks_used"] if stats is not None else None,
        "max_model_len": engine.max_model_len if engine is not None else None,
        "num_pending_requests": engine_loop.num_pending,
        "num_aborted_requests": engine_loop.num_aborted,
        "stats": dict[str, JsonValue](**stats) if stats is not None else {},
        "connector": connector_info,
    }


async def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def models(request: Request) -> JsonObject:
    instance = instance_of(request)
    engine = instance.engine_loop.built_engine
    max_model_len = engine.max_model_len if engine is not None else None
    # vLLM's model card: created is when it was listed (a 0 reads as 1970 in the clients that show it)
    return {"object": "list", "data": [{
        "id": name, "object": "model", "created": int(time.time()), "owned_by": "pdlaunch",
        "root": instance.config.model.path, "parent": None, "max_model_len": max_model_len,
    } for name in served_model_names(instance.config)]}


ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/health", health), ("GET", "/info", info), ("GET", "/metrics", prometheus_metrics),
    ("GET", "/v1/models", models)]
