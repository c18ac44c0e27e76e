"""The CPU tier's series by direction (pdlaunch_kv_offload_failed_jobs / bytes / seconds) exist at 0 for `store` and
`load` from the start, as every other pdlaunch_* series: a series that appears only with its first event hides that
event from Prometheus' rate() and increase() (they need a sample before it), so an alert on
increase(pdlaunch_kv_offload_failed_jobs_total[5m]) > 0 missed the tier's first failed load. A fresh interpreter:
another test of this worker may have counted a job already."""

from __future__ import annotations

import subprocess
import sys

SCRAPE = """
from prometheus_client import REGISTRY, generate_latest
import pdlaunch.metrics  # as in an instance: no *_created series
import pdlaunch.offload.metrics
print(generate_latest(REGISTRY).decode())
"""


def test_each_direction_series_is_exported_at_zero_before_any_job() -> None:
    done = subprocess.run([sys.executable, "-c", SCRAPE], capture_output=True, text=True, timeout=120, check=True)
    lines = set(done.stdout.splitlines())
    for direction in ("store", "load"):
        label = f'{{direction="{direction}"}}'
        for series in (
            "pdlaunch_kv_offload_failed_jobs_total",
            "pdlaunch_kv_offload_bytes_total",
            "pdlaunch_kv_offload_seconds_count",
        ):
            assert f"{series}{label} 0.0" in lines, (series, direction, done.stdout[-3000:])
