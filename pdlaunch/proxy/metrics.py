"""Proxy metrics, in the proxy's own registry (the instance metrics of pdlaunch.metrics live in instances)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.routing import Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdlaunch.metrics.buckets import FIRST_BYTE_BUCKETS
from pdlaunch.proxy.instances import InstancePool

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set for the workers of proxy.workers > 1 (workers.py)
RETRY_REASONS = ("instance_gone", "stalled", "recompute")  # a prefill leg's; any other leg's only instance_gone
MIGRATION_REASONS = ("died", "stalled")


class ProxyMetrics:
    def __init__(self, pool: InstancePool) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no `*_created` series, as at the instances
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pdlaunch_proxy_requests", "Client requests answered by the proxy", ["route", "status"],
            registry=self.registry)
        self.prefill_seconds = Histogram(
            "pdlaunch_proxy_prefill_seconds", "Time of the prefill leg of PD requests",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.time_to_first_byte = Histogram(
            "pdlaunch_proxy_time_to_first_byte_seconds", "From a POST reaching the proxy to the first byte of its "
            "2xx answer (a stream's first event): less the instance's own series, the proxy's work and its hop "
            "(http/first_byte.py)", ["route"], buckets=FIRST_BYTE_BUCKETS, registry=self.registry)
        self.federation_errors = Counter(
            "pdlaunch_proxy_federation_errors", "Instances whose /metrics the proxy's /metrics could not include",
            registry=self.registry)
        self.stalls = Counter(
            "pdlaunch_proxy_stalls_detected", "Instances seen stalled (connected, no answer in time), by role: "
            "a /health probe past proxy.health_timeout_seconds", ["role"], registry=self.registry)
        self.legs_retried = Counter(
            "pdlaunch_proxy_legs_retried", "Legs sent again after their instance failed them, by role and why "
            "(instance_gone: refused, dropped or answered shutting_down; stalled: no answer within the leg's "
            "deadline; recompute: the prefill leg given up and the prompt computed by the decode)", ["role", "reason"],
            registry=self.registry)
        self.migrations = Counter(
            "pdlaunch_proxy_migrations", "Requests moved to another decode mid-request (proxy.migration_limit), by "
            "why (died: dropped or ended its stream unfinished; stalled: marked stalled by the /health probe)",
            ["reason"], registry=self.registry)
        self.migrations_exhausted = Counter(
            "pdlaunch_proxy_migrations_exhausted", "Requests failed after proxy.migration_limit migrations",
            registry=self.registry)
        self.disaggregation = Counter(
            "pdlaunch_proxy_disaggregation_decisions", "Requests by how they ran under proxy.disaggregate_min_tokens: "
            "pd (prefill leg + KV transfer), decode_only (a short prompt computed by the decode) or spilled (computed "
            "by the decode while the prefill queue was full: proxy.disaggregate_max_queue_tokens) or pd_decode_busy "
            "(PD although it would have run on the decode, whose streams had no TPOT headroom: "
            "proxy.disaggregate_max_itl_ms)", ["decision"],
            registry=self.registry)
        self.prefix_routed = Counter(
            "pdlaunch_proxy_prefix_routed", "Legs sent to an instance for the prompt prefix it caches, more of it "
            "than another candidate (proxy.routing_policy prefix), by role", ["role"], registry=self.registry)
        self.prefix_matched_tokens = Counter(
            "pdlaunch_proxy_prefix_matched_tokens", "Prompt tokens the chosen instance caches already (its KV "
            "cache events), by role", ["role"], registry=self.registry)
        # The series of every label value this proxy can count exist at 0 from the start: one that appears with its
        # first event hides that event from rate() and increase() (an alert on migrations missed the first one).
        for role in sorted({instance.role for instance in pool.instances}):
            self.stalls.labels(role)
            for reason in RETRY_REASONS if role == "prefill" else ("instance_gone",):
                self.legs_retried.labels(role, reason)
        for reason in MIGRATION_REASONS:
            self.migrations.labels(reason)
        pool.on_stall = lambda instance: self.stalls.labels(instance.role).inc()
        pool.on_retry = lambda role, reason: self.legs_retried.labels(role, reason).inc()
        self.pool_registry = CollectorRegistry(auto_describe=False)  # this process's view, read at scrape time
        self.pool_registry.register(_PoolCollector(pool))

    def render(self) -> bytes:
        """The proxy's own series in the text format. Behind proxy.workers > 1 (PROMETHEUS_MULTIPROC_DIR set by
        the supervisor, workers.py) the counters and histograms are every worker's summed, read from the workers'
        files; the per-instance gauges are this worker's."""
        own = self.pool_registry
        if os.environ.get(MULTIPROC_ENV):
            summed = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(summed)  # type: ignore[no-untyped-call]
            return generate_latest(summed) + generate_latest(own)
        return generate_latest(self.registry) + generate_latest(own)


class _PoolCollector(Collector):
    """Per-instance state read from the pool at scrape time."""

    def __init__(self, pool: InstancePool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("pdlaunch_proxy_instance_in_flight", "Legs in flight per instance (every "
                                      "proxy worker's)",
                                      labels=["instance", "role"])
        up = GaugeMetricFamily("pdlaunch_proxy_instance_up", "1 when the instance is ready",
                               labels=["instance", "role"])
        itl = GaugeMetricFamily("pdlaunch_proxy_instance_itl_milliseconds", "Mean time between the tokens an "
                                "instance streamed over the last second, as its /health last said (instances that "
                                "report none are left out); proxy.disaggregate_max_itl_ms compares it",
                                labels=["instance", "role"])
        for inst in self._pool.instances:
            in_flight.add_metric([inst.name, inst.role], inst.in_flight)
            up.add_metric([inst.name, inst.role], 1.0 if inst.state == "ready" else 0.0)
            if inst.itl_ms is not None:
                itl.add_metric([inst.name, inst.role], inst.itl_ms)
        yield in_flight
        yield up
        yield itl


OTHER_ROUTE = "other"


class RouteLabel:
    """A request path as a metric label: the path only when the app has that route, else OTHER_ROUTE: a scan of
    random paths must not add a series per path (5,000 unknown GETs grew /metrics from 5 KB to 2.7 MB)."""

    def __init__(self, router: Router) -> None:
        self._router = router  # routes are added after the middleware: read them at the first request
        self._known: frozenset[str] | None = None

    def __call__(self, path: str) -> str:
        if self._known is None:
            self._known = frozenset(getattr(route, "path", "") for route in self._router.routes)
        return path if path in self._known else OTHER_ROUTE


class CountRequests:
    """ASGI middleware counting every answer by route (RouteLabel) and status."""

    def __init__(self, app: ASGIApp, counter: Counter, router: Router) -> None:
        self.app = app
        self.counter = counter
        self._route_label = RouteLabel(router)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]  # what the client sees if the app fails before answering

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            path = scope.get("path", "")
            self.counter.labels(self._route_label(path), str(status[0])).inc()
