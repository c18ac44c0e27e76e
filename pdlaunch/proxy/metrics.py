"""Proxy metrics, in the proxy's own registry (the instance metrics of pdlaunch.metrics live in instances)."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pdlaunch.proxy.instances import InstancePool


class ProxyMetrics:
    def __init__(self, pool: InstancePool) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pdlaunch_proxy_requests", "Client requests answered by the proxy", ["route", "status"],
            registry=self.registry)
        self.prefill_seconds = Histogram(
            "pdlaunch_proxy_prefill_seconds", "Time of the prefill leg of PD requests",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.registry.register(_PoolCollector(pool))


class _PoolCollector(Collector):
    """Per-instance state read from the pool at scrape time."""

    def __init__(self, pool: InstancePool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("pdlaunch_proxy_instance_in_flight", "Legs in flight per instance",
                                      labels=["instance", "role"])
        up = GaugeMetricFamily("pdlaunch_proxy_instance_up", "1 when the instance is ready",
                               labels=["instance", "role"])
        for inst in self._pool.instances:
            in_flight.add_metric([inst.name, inst.role], inst.in_flight)
            up.add_metric([inst.name, inst.role], 1.0 if inst.state == "ready" else 0.0)
        yield in_flight
        yield up
