"""The OpenAI-compatible PD proxy app: its state, its lifespan, its middleware, and every route it serves.

The routes are module-level handlers that read the shared state (state.ProxyState) from the app:
completions.py (the PD request), routes.py (health, metrics, relays to one instance, control calls).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.responses import Response

from pdlaunch.config.launcher_config import SecurityConfig
from pdlaunch.http.auth import AccessPolicy, RequireAuth
from pdlaunch.http.errors import install_error_handlers
from pdlaunch.http.first_byte import FirstByteTimer
from pdlaunch.http.limits import BodyLimit
from pdlaunch.http.shutdown_answer import ShutdownAnswer
from pdlaunch.proxy import completions, routes
from pdlaunch.proxy.disaggregate import Disaggregation, PromptTokens
from pdlaunch.proxy.held_writes import held_writes_transport
from pdlaunch.proxy.instances import InstancePool
from pdlaunch.proxy.kv_events import KvEventFeed
from pdlaunch.proxy.metrics import CountRequests, RouteLabel
from pdlaunch.proxy.migrate import DEFAULT_MIGRATION_LIMIT, Migrations
from pdlaunch.proxy.prefill_leg import PrefillDeadline, PrefillLegs
from pdlaunch.proxy.prefix import PrefixRouter
from pdlaunch.proxy.state import ProxyState
from pdlaunch.proxy.upstream import Proxy

# A pooled connection idle this long is not reused: below the 5 s after which uvicorn (vLLM's instances
# too) closes an idle connection, so a leg is not sent on one the instance is closing at that moment
# (a dropped leg: retried on another instance, but marked down for a probe's interval). Ours keep 30 s.
KEEPALIVE_S = 3.0
# Idle connections kept per instance. httpcore closes an idle one whenever its pool holds more connections
# than this, and walks all of them for each idle one it looks at: with 256, 128 streams cost 15% more proxy
# CPU per event than with 32 (benchmarks/proxy_relay.py). Up to 32 streams an instance, every leg reuses one.
KEEPALIVE_CONNECTIONS = 32

# (method, path, handler): every route of the proxy.
ROUTES: list[tuple[str, str, Callable[..., Awaitable[Response]]]] = [
    ("GET", "/health", routes.health),
    ("GET", "/instances", routes.instances),
    ("GET", "/metrics", routes.metrics),
    ("GET", "/v1/models", routes.relay_to_one),
    ("POST", "/v1/completions", completions.completions),
    ("POST", "/v1/chat/completions", completions.chat_completions),
    ("POST", "/tokenize", routes.relay_to_one),
    ("POST", "/detokenize", routes.relay_to_one),
    ("GET", "/version", routes.version),
    ("POST", "/sleep", routes.fan_out),
    ("POST", "/wake_up", routes.fan_out),
    ("GET", "/is_sleeping", routes.fan_out),
]


def build_proxy_app(pool: InstancePool, request_timeout_s: float, api_key: str | None = None,
                    deployment_secret: str | None = None,
                    max_request_bytes: int = SecurityConfig().max_request_bytes,
                    prefill_timeout_s: float | None = None, load_failure_policy: str = "recompute",
                    migration_limit: int = DEFAULT_MIGRATION_LIMIT,
                    disaggregation: Disaggregation | None = None, tokenizer_dir: Path | None = None,
                    chat_template: str | None = None) -> FastAPI:
    """The proxy app. Access as at the instances (http/auth.py): `api_key` for clients, the internal
    token derived from `deployment_secret` towards the instances. The prefill leg runs under its own
    deadline (`prefill_timeout_s`, None: derived; prefill_leg.py); a decode leg whose instance dies or
    stalls goes on on another decode, at most `migration_limit` times (migrate.py); `disaggregation`
    sends prompts with few uncached tokens to a decode alone (disaggregate.py; None: every request is PD);
    the pool's policy `prefix` routes by cached prefix (prefix.py), hashing prompts tokenized with the
    checkpoint's tokenizer at `tokenizer_dir` (or disaggregation's), with the deployment's `chat_template` if any."""
    if load_failure_policy not in ("recompute", "fail"):
        raise ValueError(f"load_failure_policy {load_failure_policy!r}: choose recompute or fail")
    proxy = Proxy(pool, request_timeout_s, deployment_secret)
    disaggregation = disaggregation or Disaggregation(None, None)
    tokens = disaggregation.tokens or (PromptTokens(tokenizer_dir, chat_template) if tokenizer_dir is not None
                                       else None)
    by_prefix = pool.policy_name == "prefix"
    if by_prefix and tokens is None:
        raise ValueError("routing policy prefix hashes the prompt's token ids: give the checkpoint's tokenizer")
    # The instances' cached blocks matter to prefix routing and to disaggregation by uncached tokens.
    feed = KvEventFeed(pool.instances, proxy.upstream_headers) \
        if by_prefix or disaggregation.min_tokens is not None else None
    state = ProxyState(
        proxy=proxy,
        prefill_legs=PrefillLegs(proxy, PrefillDeadline(prefill_timeout_s),
                                 recompute=load_failure_policy == "recompute"),
        migrations=Migrations(proxy, migration_limit, on_migrate=lambda why: proxy.metrics.migrations.labels(why).inc(),
                              on_exhausted=proxy.metrics.migrations_exhausted.inc),
        disaggregation=disaggregation, router=PrefixRouter(pool, feed, tokens, by_prefix))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=2048, max_keepalive_connections=KEEPALIVE_CONNECTIONS,
                              keepalive_expiry=KEEPALIVE_S)
        mounts = instance_transports(pool, limits)
        async with httpx.AsyncClient(limits=limits, trust_env=False, mounts=mounts) as client:
            proxy.client = proxy.kv.client = client
            await pool.check_all(client)
            pool.start_monitor(client)
            if feed is not None:
                feed.start(client)
            try:
                yield
            finally:
                if feed is not None:
                    await feed.stop()
                await pool.stop_monitor()
                await proxy.kv.drain()
                proxy.client = proxy.kv.client = None

    app = FastAPI(title="pdlaunch proxy", lifespan=lifespan)
    app.state.proxy_state = state
    install_error_handlers(app)
    # Outermost first: time the first byte, count every answer, then authenticate, then answer 503 shutting_down to
    # a request the drain at shutdown cuts before its response began (one whose body still arrives too: outside
    # BodyLimit), then bound the body.
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_middleware(ShutdownAnswer, stopping=proxy.stopping)
    app.add_middleware(RequireAuth, policy=AccessPolicy.from_secrets(api_key, deployment_secret))
    app.add_middleware(CountRequests, counter=proxy.metrics.requests, router=app.router)
    app.add_middleware(FirstByteTimer, histogram=proxy.metrics.time_to_first_byte, label=RouteLabel(app.router))
    for method, path, handler in ROUTES:  # HEAD wherever GET: a load balancer's probe is no 405 (RFC 9110 9.3.2)
        app.add_api_route(path, handler, methods=[method, "HEAD"] if method == "GET" else [method])
    return app


def instance_transports(pool: InstancePool, limits: httpx.Limits) -> dict[str, httpx.AsyncBaseTransport]:
    """A connection pool of its own per instance (httpx mounts by origin). httpcore walks every connection of a
    pool each time a request starts or ends, and for each idle one walks them all again (quadratic): with one
    pool for all instances, every leg paid for every instance's connections (12% of the proxy's CPU at 32
    streams, benchmarks/proxy_relay.py). Each sends a request's head and body in one send (held_writes.py)."""
    # netloc: host and port as written ([::1]:8100; a URL without a port has none: its pattern matches any).
    origins = {f"{url.scheme}://{url.netloc.decode('ascii')}" for url in (httpx.URL(i.url) for i in pool.instances)}
    return {origin: held_writes_transport(limits) for origin in sorted(origins)}
