"""Prometheus metrics of an instance (names from DESIGN.md). Import the objects, never re-create them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

KV_TRANSFER_BYTES = Counter("pdlaunch_kv_transfer_bytes", "KV bytes moved between instances")
KV_TRANSFER_SECONDS = Histogram(
    "pdlaunch_kv_transfer_seconds", "Time of one request's KV transfer",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
KV_TRANSFER_FAILURES = Counter("pdlaunch_kv_transfer_failures", "KV transfers that failed")
KV_EXPIRED_REQUESTS = Counter("pdlaunch_kv_expired_requests", "Held KV freed by lease expiry")
KV_BLOCKS_USED = Gauge("pdlaunch_kv_blocks_used", "KV blocks in use")
KV_BLOCKS_TOTAL = Gauge("pdlaunch_kv_blocks_total", "KV blocks in the cache")
REQUESTS_RUNNING = Gauge("pdlaunch_requests_running", "Requests being computed")
REQUESTS_WAITING = Gauge("pdlaunch_requests_waiting", "Requests waiting for blocks or KV")
TIME_TO_FIRST_TOKEN = Histogram(
    "pdlaunch_time_to_first_token_seconds", "Time to first token",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INTER_TOKEN_LATENCY = Histogram(
    "pdlaunch_inter_token_latency_seconds", "Time between streamed tokens",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
