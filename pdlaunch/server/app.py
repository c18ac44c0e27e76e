"""The instance HTTP API: OpenAI routes plus health, info, metrics, tokenize and sleep control.

Every route is a module-level handler; each route module lists its routes in `ROUTES` (method, path,
handler) and build_app registers the modules of ROUTE_MODULES, the one place a new one is added. A
handler reads what it needs from the `Instance` on the app's state (server/instance.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.http.auth import AccessPolicy, RequireAuth
from pdlaunch.http.errors import install_error_handlers
from pdlaunch.http.first_byte import FirstByteTimer
from pdlaunch.http.limits import BodyLimit
from pdlaunch.http.shutdown_answer import ShutdownAnswer
from pdlaunch.metrics.instance import TIME_TO_FIRST_BYTE
from pdlaunch.metrics.vllm_series import set_model_name
from pdlaunch.server import completions, internal, kv_events, sleep, status, tokenize
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.instance import Instance

ROUTE_MODULES = (status, completions, tokenize, sleep, internal, kv_events)


def build_app(engine_loop: EngineLoop, config: DeploymentConfig, spec: InstanceSpec) -> FastAPI:
    """The FastAPI app of one instance. The lifespan starts and stops the engine thread. Setting
    `app.state.stopping` (server/__main__.py: shortly before the drain at shutdown runs out) answers what is still
    running 503 shutting_down, a stream its error event, the proxy's too (http/shutdown_answer.py: the proxy continues
    the stream on another decode where it can, else passes the event on to its client)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine_loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine_loop.stop)

    app = FastAPI(title=f"pdlaunch {spec.name}", lifespan=lifespan)
    install_error_handlers(app)
    app.state.stopping = stopping = asyncio.Event()
    security = config.security  # the last middleware added runs first: no body is read before auth
    policy = AccessPolicy.from_secrets(security.api_key, security.deployment_secret)
    app.add_middleware(BodyLimit, max_bytes=security.max_request_bytes)
    # Outside BodyLimit: a request whose body still arrives at the drain's end is cut and answered as the others.
    app.add_middleware(ShutdownAnswer, stopping=stopping, cut_streams=True)
    app.add_middleware(RequireAuth, policy=policy)
    app.add_middleware(FirstByteTimer, histogram=TIME_TO_FIRST_BYTE)
    instance = Instance(engine_loop, config, spec)
    app.state.instance = instance
    set_model_name(instance.model_name)
    for module in ROUTE_MODULES:
        for method, path, handler in module.ROUTES:
            # HEAD wherever GET, as the proxy: a load balancer's probe of /health is no 405 (RFC 9110 9.3.2)
            app.add_api_route(path, handler, methods=[method, "HEAD"] if method == "GET" else [method],
                              response_model=None)
    return app
