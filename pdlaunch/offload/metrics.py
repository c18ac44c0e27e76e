"""Prometheus metrics of the CPU offload tier. Import the objects, never re-create them.

Blocks are logical token blocks (one block position of a sequence, every KV-cache group together).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

DIRECTIONS = ("store", "load")  # store: device -> CPU; load: CPU -> device
OFFLOAD_STORED_BLOCKS = Counter("pdlaunch_kv_offload_stored_blocks", "KV blocks stored from the device to the CPU tier")
OFFLOAD_LOADED_BLOCKS = Counter("pdlaunch_kv_offload_loaded_blocks", "KV blocks loaded from the CPU tier to the device")
OFFLOAD_HIT_BLOCKS = Counter("pdlaunch_kv_offload_hit_blocks", "Prompt blocks found in the CPU tier and loaded for a "
                             "prefix hit (counted once their load did not fail)")
OFFLOAD_FAILED_JOBS = Counter("pdlaunch_kv_offload_failed_jobs", "Offload transfer jobs that failed (their CPU blocks "
                              "are dropped; a failed load ends its request with an error)", ["direction"])
OFFLOAD_BYTES = Counter("pdlaunch_kv_offload_bytes", "KV bytes moved between the device and the CPU tier",
                        ["direction"])
OFFLOAD_SECONDS = Histogram(
    "pdlaunch_kv_offload_seconds", "Time of one offload transfer job", ["direction"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
# Each direction's series exists at 0 from the start: one that appears with its first job hides that job from rate()
# and increase() (an alert on failed jobs missed the tier's first failure).
for _direction in DIRECTIONS:
    for _metric in (OFFLOAD_FAILED_JOBS, OFFLOAD_BYTES, OFFLOAD_SECONDS):
        _metric.labels(direction=_direction)
