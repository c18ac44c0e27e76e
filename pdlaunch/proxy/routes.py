"""The proxy's routes other than completions: health, instances, metrics, the relays to one instance
(/v1/models, /tokenize, /detokenize), /version, and the control calls fanned out to every instance.

Every instance of a deployment serves the same checkpoint and tokenizer, so /v1/models, /tokenize and
/detokenize go to one ready instance (of the role that answers requests, retried once on another when
it is gone: retry.py) and its answer, a 4xx naming the field included, is relayed as it is (relay_to_one).
/version answers here (the same version as every instance: one package). `/sleep`, `/wake_up` and
`/is_sleeping` go to every instance (docs/ARCHITECTURE.md "CuMem and sleep"). RequireAuth has already
checked the caller's API key (http/auth.py); the calls to instances carry the internal token.
"""

from __future__ import annotations

import asyncio
import os

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, JsonValue

import pdlaunch
from pdlaunch.http.answers import AnswerTooLarge, fetch
from pdlaunch.http.errors import OpenAIError, error_body
from pdlaunch.http.limits import body_problem, parse_json_object
from pdlaunch.proxy.bodies import as_object
from pdlaunch.proxy.federate import instance_metrics
from pdlaunch.proxy.instances import Instance
from pdlaunch.proxy.retry import on_live_instance
from pdlaunch.proxy.state import state_of
from pdlaunch.proxy.upstream import CONNECT_TIMEOUT_S

# What an instance's answer to a relayed call may hold: /tokenize of a prompt at the longest max_model_len
# (about 10 bytes per token id) and /v1/models are far below it; a control call's answer is a few fields.
RELAY_MAX_BYTES = 64 << 20
CONTROL_MAX_BYTES = 1 << 20


async def health(request: Request) -> JSONResponse:
    """200 while every role has a ready instance; 503 naming the roles that have none. Once the deployment has been
    ready, a PD deployment without a ready prefill still answers every request under kv_transfer.load_failure_policy
    recompute (its decodes compute the prompts: prefill_leg.py), so a ready decode keeps the proxy 200, `degraded`
    saying why (a Kubernetes readiness probe would otherwise take the proxy out of its Service while a prefill pod
    restarts). Before the deployment's first ready moment it waits for every role, as the launcher's start does."""
    state = state_of(request)
    pool = state.pool
    missing = [r for r in pool.required_roles() if not any(i.role == r and i.state == "ready" for i in pool.instances)]
    body: dict[str, object] = {"status": "ok" if not missing else "unavailable", "pid": os.getpid(),
                               "instances": [i.as_dict() for i in pool.instances]}
    if missing == ["prefill"] and pool.been_ready and state.prefill_legs.recompute:
        body.update(status="ok", degraded="no ready prefill instance: the decodes compute the prompts "
                                          "(kv_transfer.load_failure_policy recompute) until one is ready again")
        return JSONResponse(body)
    if missing:
        body.update(error_body(503, f"no ready {' / '.join(missing)} instance"))
    return JSONResponse(body, status_code=503 if missing else 200)


async def instances(request: Request) -> JSONResponse:
    return JSONResponse([i.as_dict() for i in state_of(request).pool.instances])


async def metrics(request: Request) -> Response:
    proxy = state_of(request).proxy
    federated, missed = await instance_metrics(proxy.http(), proxy.pool, proxy.upstream_headers)
    proxy.metrics.federation_errors.inc(missed)
    return Response(proxy.metrics.render() + federated, media_type=CONTENT_TYPE_LATEST)


async def version() -> JSONResponse:
    return JSONResponse({"version": pdlaunch.__version__})


def upstream_method(request: Request) -> str:
    """The method of a relayed call: a HEAD is asked of the instance as the GET it stands for (the server drops
    the body of the answer to a HEAD)."""
    return "GET" if request.method == "HEAD" else request.method


async def relay_to_one(request: Request) -> Response:
    """The request, as it is, to one ready instance; its answer, as it is, to the client."""
    state = state_of(request)
    proxy, pool = state.proxy, state.pool
    raw = await request.body()
    headers = state.forwarded_headers(request)
    if request.method == "POST":
        headers["Content-Type"] = "application/json"

    async def ask(instance: Instance) -> tuple[int, bytes]:
        try:
            return await fetch(proxy.http(), upstream_method(request), instance.url + request.url.path,
                               timeout_s=proxy.request_timeout_s, connect_timeout_s=CONNECT_TIMEOUT_S,
                               max_bytes=RELAY_MAX_BYTES, headers=headers, content=raw or None)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise proxy.failed(instance, exc) from None
        except AnswerTooLarge as exc:
            raise OpenAIError(502, f"{instance.name} ({instance.url}) sent {exc}", code="instance_failed") from None

    role = pool.required_roles()[-1]
    _, (status, content) = await on_live_instance(pool, role, pool.pick(role), ask)
    return Response(content, status_code=status, media_type="application/json")


class FannedOut(BaseModel):
    """One instance's answer to a control call."""

    name: str
    status: int
    body: JsonValue


async def _control_one(request: Request, instance: Instance) -> FannedOut:
    proxy = state_of(request).proxy
    try:
        status, raw = await fetch(proxy.http(), upstream_method(request), instance.url + request.url.path,
                                  timeout_s=proxy.request_timeout_s, max_bytes=CONTROL_MAX_BYTES,
                                  params=request.query_params, headers=proxy.upstream_headers)
    except httpx.HTTPError as exc:
        return FannedOut(name=instance.name, status=502, body=error_body(502, f"{type(exc).__name__}: {exc}"))
    except TimeoutError:
        return FannedOut(name=instance.name, status=504, body=error_body(
            504, f"no whole answer within proxy.request_timeout_seconds ({proxy.request_timeout_s:g}s)"))
    except AnswerTooLarge as exc:
        return FannedOut(name=instance.name, status=502, body=error_body(502, f"sent {exc}"))
    try:
        # Strict, as a client's body: a NaN or a lone surrogate would fail this whole answer's JSON (a 500).
        content = parse_json_object(raw) if raw else {}
    except OpenAIError as exc:
        message = f"answered with a body that is not a valid JSON object ({body_problem(exc)})"
        return FannedOut(name=instance.name, status=502, body=error_body(502, message))
    return FannedOut(name=instance.name, status=status, body=content)


async def fan_out(request: Request) -> JSONResponse:
    """The control call to every instance; the first failure (if any) is the answer's status."""
    results = await asyncio.gather(*(_control_one(request, i) for i in state_of(request).pool.instances))
    listed = [r.model_dump() for r in results]
    failed = [r for r in results if r.status != 200]
    if not failed:
        return JSONResponse({"instances": listed})
    first = failed[0]
    inner = as_object(first.body.get("error")) if isinstance(first.body, dict) else None
    inner = inner or {}
    status = first.status if first.status < 500 or first.status == 503 else 502
    param, code = inner.get("param"), inner.get("code")
    body = error_body(status, f"{first.name}: {inner.get('message', 'failed')}",
                      param=param if isinstance(param, str) else None, code=code if isinstance(code, str) else None)
    body["instances"] = listed
    return JSONResponse(body, status_code=status)
