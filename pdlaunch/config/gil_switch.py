"""PDLAUNCH_GIL_SWITCH_MS: how long one thread of an instance process may hold the GIL while another waits for it
(sys.setswitchinterval), read by every instance. An instance runs its engine thread and its HTTP event loop in one
process: with Python's default of 5 ms, an answer ready on one thread waited for the other's turn to end. At 0.5 ms,
on one H200 (8B shape, 4096-token prompts one at a time, benchmarks/RESULTS.md 2026-11-29): PD TTFT median 116.9
against 125.7 ms (the prefill instance's own request time 99.0 against 106.2 ms), TPOT median colocated 4.5 against
4.8 ms and PD 5.1 against 5.35 ms; colocated TTFT the same (109.3 against 109.1 ms). Under load (256 prompts of
1024 in / 128 out, 64 in flight, four alternating runs) throughput and ITL p99 were within the spread between runs.
A value that is no positive number of milliseconds up to 100 leaves the default; check-config and serve say so
(config/serving_env.py), since the processes that read it cannot tell the user."""

from __future__ import annotations

import math
from collections.abc import Mapping

GIL_SWITCH_ENV = "PDLAUNCH_GIL_SWITCH_MS"
DEFAULT_GIL_SWITCH_MS = 0.5
MAX_GIL_SWITCH_MS = 100.0


def milliseconds(text: str) -> float | None:
    """`text` as a number of milliseconds in (0, MAX], else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 < value <= MAX_GIL_SWITCH_MS else None


def gil_switch_seconds(env: Mapping[str, str]) -> float:
    """The interval an instance sets (sys.setswitchinterval takes seconds): the variable's, else the default."""
    text = env.get(GIL_SWITCH_ENV)
    value = None if text is None else milliseconds(text)
    return (DEFAULT_GIL_SWITCH_MS if value is None else value) / 1000
