"""What `pdlaunch bench serve` reports: per-request results -> metrics, table and JSON (the plots: plots.py).

Metric definitions follow vLLM's `bench serve` so figures compare across systems:
- TTFT: request sent -> first chunk that carries a choice.
- ITL: gaps between consecutive such chunks (one entry per gap, pooled over requests).
- E2EL: request sent -> last such chunk.
- TPOT: (E2EL - TTFT) / (output_len - 1), only for output_len > 1; for goodput a request with
  output_len <= 1 counts TPOT 0.
- goodput: requests that meet every given SLO (TTFT/TPOT/E2EL in ms) per second of duration.
- throughput: completed requests, output tokens, input + output tokens per second of duration.
Percentiles are numpy's linear interpolation; an empty list reports 0, as vLLM does.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from pydantic import BaseModel, JsonValue
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pdlaunch.bench.flag_numbers import non_finite
from pdlaunch.errors import PdlaunchError

ServeDoc = dict[str, JsonValue]  # a `bench serve` result document (vLLM's field names), as written to JSON

MS_PER_S = 1000.0
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
PERCENTILES = (90, 99)
TITLES = {
    "ttft": "Time to first token",
    "tpot": "Time per output token (excl. 1st)",
    "itl": "Inter-token latency",
    "e2el": "End-to-end latency",
}


@dataclass
class RequestResult:
    """One request as the client saw it. Times in seconds (perf_counter deltas)."""

    success: bool = False
    prompt_len: int = 0  # tokens sent (server's usage.prompt_tokens when reported)
    output_len: int = 0  # tokens received (usage.completion_tokens, else chunks with a choice)
    ttft: float = 0.0
    latency: float = 0.0  # E2EL
    itl: list[float] = field(default_factory=list)
    start: float = 0.0  # send time relative to the benchmark start, for plots
    error: str = ""


class LatencyStats(BaseModel):
    mean: float
    median: float
    std: float
    p90: float
    p99: float


class BenchMetrics(BaseModel):
    """Aggregates of one run. Latency stats are in ms, throughputs per second of `duration`."""

    duration: float  # s, first request sent -> last response done
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: float | None  # None when no SLO was given
    output_throughput: float
    total_token_throughput: float
    latency_ms: dict[str, LatencyStats]


def _stats_ms(values_s: list[float]) -> LatencyStats:
    data = np.asarray(values_s or [0.0], dtype=np.float64) * MS_PER_S
    return LatencyStats(
        mean=float(np.mean(data)),
        median=float(np.median(data)),
        std=float(np.std(data)),
        p90=float(np.percentile(data, 90)),
        p99=float(np.percentile(data, 99)),
    )


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` -> {"ttft": 200.0, "tpot": 50.0} (ms)."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        name = name.strip().lower()
        if not sep or name not in GOODPUT_METRICS:
            raise PdlaunchError(
                f"bad SLO {spec!r}", field="--goodput", hint="use NAME:MS with NAME one of ttft, tpot, e2el"
            )
        try:
            ms = float(value)
        except ValueError:
            raise PdlaunchError(f"bad SLO value in {spec!r}", field="--goodput", hint="MS must be a number") from None
        why = non_finite(ms, "a positive number of milliseconds, e.g. ttft:200")
        if why is not None:  # NaN no latency would meet; an infinite SLO every one meets
            raise PdlaunchError(f"SLO {spec!r}: {why.replace('; give', ': give', 1)}", field="--goodput")
        if not ms > 0:
            raise PdlaunchError(f"SLO {spec!r} must be positive", field="--goodput", hint="give milliseconds > 0")
        if name in slos:
            raise PdlaunchError(f"{name} is given twice ({slos[name]:g} and {ms:g} ms)", field="--goodput",
                                hint=f"give one {name}:MS")
        slos[name] = ms
    return slos


def calculate_metrics(results: list[RequestResult], duration: float, goodput_ms: dict[str, float]) -> BenchMetrics:
    ttfts: list[float] = []
    tpots: list[float] = []  # only requests with output_len > 1
    all_tpots: list[float] = []  # every completed request, 0 when output_len <= 1 (goodput)
    itls: list[float] = []
    e2els: list[float] = []
    total_input = total_output = 0
    for r in results:
        if not r.success:
            continue
        total_input += r.prompt_len
        total_output += r.output_len
        tpot = 0.0
        if r.output_len > 1:
            tpot = (r.latency - r.ttft) / (r.output_len - 1)
            tpots.append(tpot)
        all_tpots.append(tpot)
        itls.extend(r.itl)
        ttfts.append(r.ttft)
        e2els.append(r.latency)
    completed = len(ttfts)

    goodput: float | None = None
    if goodput_ms:
        per_metric = {"ttft": ttfts, "tpot": all_tpots, "e2el": e2els}
        names = list(goodput_ms)
        good = sum(
            all(value * MS_PER_S <= goodput_ms[name] for name, value in zip(names, row))
            for row in zip(*(per_metric[name] for name in names))
        )
        goodput = good / duration

    return BenchMetrics(
        duration=duration,
        completed=completed,
        failed=len(results) - completed,
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=completed / duration,
        request_goodput=goodput,
        output_throughput=total_output / duration,
        total_token_throughput=(total_input + total_output) / duration,
        latency_ms={
            "ttft": _stats_ms(ttfts), "tpot": _stats_ms(tpots), "itl": _stats_ms(itls), "e2el": _stats_ms(e2els)
        },
    )


def result_dict(metrics: BenchMetrics, results: list[RequestResult], run_info: ServeDoc) -> ServeDoc:
    """The JSON document: run settings, vLLM-named aggregates (`mean_ttft_ms`, ...), per-request lists."""
    out: ServeDoc = {"date": _dt.datetime.now().strftime("%Y%m%d-%H%M%S"), **run_info}
    out.update(metrics.model_dump(exclude={"latency_ms"}))
    if out["request_goodput"] is None:
        del out["request_goodput"]
    for name, stats in metrics.latency_ms.items():
        out[f"mean_{name}_ms"] = stats.mean
        out[f"median_{name}_ms"] = stats.median
        out[f"std_{name}_ms"] = stats.std
        for p in PERCENTILES:
            out[f"p{p}_{name}_ms"] = getattr(stats, f"p{p}")
    out["input_lens"] = [r.prompt_len for r in results]
    out["output_lens"] = [r.output_len for r in results]
    out["start_times"] = [r.start for r in results]
    out["ttfts"] = [r.ttft for r in results]
    out["e2els"] = [r.latency for r in results]
    out["itls"] = [[*r.itl] for r in results]
    out["errors"] = [r.error for r in results]
    return out


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """`write` into a new file beside `path`, synced and renamed over it: a full disk, a folder that cannot be
    written, Ctrl-C or SIGTERM leave the earlier file or none, never half of one at `path` (OSError otherwise)."""
    part = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")  # hidden, and never an earlier run's
    try:
        with open(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(part, path)
    finally:
        with contextlib.suppress(OSError):  # gone already once renamed, or never created
            part.unlink()


def write_json(doc: Mapping[str, object], path: Path) -> None:
    text = json.dumps(doc, indent=2) + "\n"  # first: a value JSON cannot hold fails before any file exists
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda file: file.write(text.encode()))


def print_report(console: Console, metrics: BenchMetrics, results: list[RequestResult], goodput_ms: dict[str, float],
                 max_errors: int = 5) -> None:
    summary = Table(title="Serving benchmark", show_header=False, title_justify="left")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_row("Successful requests", str(metrics.completed))
    summary.add_row("Failed requests", str(metrics.failed))
    summary.add_row("Benchmark duration (s)", f"{metrics.duration:.2f}")
    summary.add_row("Total input tokens", str(metrics.total_input_tokens))
    summary.add_row("Total generated tokens", str(metrics.total_output_tokens))
    summary.add_row("Request throughput (req/s)", f"{metrics.request_throughput:.2f}")
    if metrics.request_goodput is not None:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in goodput_ms.items())
        summary.add_row(escape(f"Request goodput (req/s) [{slos}]"), f"{metrics.request_goodput:.2f}")
    summary.add_row("Output token throughput (tok/s)", f"{metrics.output_throughput:.2f}")
    summary.add_row("Total token throughput (tok/s)", f"{metrics.total_token_throughput:.2f}")
    console.print(summary)

    latency = Table(title="Latency (ms)", title_justify="left")
    for col in ("metric", "mean", "median", "p90", "p99"):
        latency.add_column(col, justify="left" if col == "metric" else "right")
    for name in LATENCY_METRICS:
        s = metrics.latency_ms[name]
        latency.add_row(f"{name.upper()}  {TITLES[name]}", *(f"{v:.2f}" for v in (s.mean, s.median, s.p90, s.p99)))
    console.print(latency)

    errors = [r.error for r in results if not r.success]
    if errors:
        console.print(f"[red]{len(errors)} request(s) failed[/red]; first errors:", highlight=False)
        for err in errors[:max_errors]:
            console.print(f"  - {escape(err)}", highlight=False, soft_wrap=True)  # a server's text, not markup
