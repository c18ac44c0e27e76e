"""Our series of engine steps (`pdlaunch_engine_*`): steps by kind and by how the forward ran, and the slow
decode steps (bench/engine_load.py reads them).
"""

from __future__ import annotations

from prometheus_client import Counter

# Engine steps by kind: `prefill` (some request computes more than one token: a prompt or its chunk, decodes
# of colocated instances ride along) or `decode`. `bench compare` reads them for utilisation and its P:D advisor.
STEP_KINDS = ("prefill", "decode")
ENGINE_STEPS = Counter("pdlaunch_engine_steps", "Engine steps that computed tokens, by kind", ["kind"])
ENGINE_STEP_SECONDS = Counter("pdlaunch_engine_step_seconds", "Seconds of engine steps (inputs, forward, "
                              "sampling; device time on CUDA: engine/step_clock.py), by kind", ["kind"])
ENGINE_STEP_TOKENS = Counter("pdlaunch_engine_step_tokens", "Tokens computed in engine steps, by kind", ["kind"])
ENGINE_SLOW_DECODE_STEPS = Counter("pdlaunch_engine_slow_decode_steps", "Decode steps (no prompt tokens) of 50 ms "
                                   "or more and 4x the recent decode steps' mean: every stream waited that long "
                                   "(engine/step_clock.py)")
ENGINE_LATE_LAUNCHES = Counter("pdlaunch_engine_late_launches", "Steps whose forward was queued after the step in "
                               "flight had finished: the device waited for the host (engine/arrival_window.py)")
STEP_PATHS = ("decode", "rows", "piecewise", "eager")
ENGINE_STEP_PATHS = Counter("pdlaunch_engine_step_paths", "Forwards by how they ran: a decode CUDA graph (decode), "
                            "a decode graph with prompt tokens as rows (rows), graphs around eager attention "
                            "(piecewise), or eager", ["path"])
_STEP_PATH_SERIES = {path: ENGINE_STEP_PATHS.labels(path=path) for path in STEP_PATHS}  # looked up once, not a step
for _kind in STEP_KINDS:
    for _metric in (ENGINE_STEPS, ENGINE_STEP_SECONDS, ENGINE_STEP_TOKENS):
        _metric.labels(kind=_kind)  # both series exist from the start


def observe_step(num_requests: int, num_tokens: int, seconds: float) -> None:
    """One engine step that computed `num_tokens` tokens for `num_requests` requests in `seconds`."""
    kind = "prefill" if num_tokens > num_requests else "decode"
    ENGINE_STEPS.labels(kind=kind).inc()
    ENGINE_STEP_SECONDS.labels(kind=kind).inc(seconds)
    ENGINE_STEP_TOKENS.labels(kind=kind).inc(num_tokens)


def count_slow_decode_step() -> None:
    ENGINE_SLOW_DECODE_STEPS.inc()


def count_late_launch() -> None:
    ENGINE_LATE_LAUNCHES.inc()


def count_step_path(path: str) -> None:
    """One forward of this rank's model that ran as `path` (STEP_PATHS)."""
    _STEP_PATH_SERIES[path].inc()
