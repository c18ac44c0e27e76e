"""`pdlaunch bench compare`: colocated instances, then a PD deployment, on the same devices in turn,
each driven through the same `bench serve` workload at every rate; then the P:D advisor (advisor.py) picks the
xPyD split of the GPUs from what the PD run measured, and that split runs too (unless it is the one just run, or
no split meets the SLOs).

Both deployments see the same requests: prompts, lengths and arrivals come from `seed + i` at the
i-th rate (fresh prompts per rate, so that prefix caching cannot serve a later rate from an earlier
one), identical for the two deployments. Every instance runs with TP 1, one per GPU.

With `--disaggregate-min-tokens N` a third deployment runs after the PD one: the same split with the proxy's
per-request disaggregation (`proxy.disaggregate_min_tokens`), so a mixed workload (`--input-lens 64,3072`) shows
it against both always-PD and colocated serving (issue 31's acceptance).
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pydantic import BaseModel, JsonValue
from rich.console import Console

from pdlaunch.bench.advisor import Advice, DecodePoint, Workload, advise, workload
from pdlaunch.bench.compare_advice import skipped_because
from pdlaunch.bench.compare_config import BASELINE_FREE, KINDS, CompareConfig
from pdlaunch.bench.compare_layout import (
    Layout,
    advised_layout,
    check_request_fits,
    checked_config,
    deployment_config,
    num_gpus,
    own_setting_warnings,
    prefill_yardstick,
    resolve_layout,
    say_once,
)
from pdlaunch.bench.goodput import RatePoint
from pdlaunch.bench.matmul_ceiling import Yardstick
from pdlaunch.bench.rate_sweep import DeploymentRun, check_sweep_fits, run_deployment
from pdlaunch.bench.report import ServeDoc, write_atomic
from pdlaunch.config.problems import Problem, with_article
from pdlaunch.config.rules.host import make_output_dir
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.serve import StopRequested, StopSignals

# Ctrl-C keeps Python's own KeyboardInterrupt (inside a rate's requests, asyncio.run's cancellation of them).
TERMINATION = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def termination_as_interrupt() -> Iterator[StopSignals]:
    """SIGTERM/SIGHUP stop the comparison like Ctrl-C, so that the `finally` stopping the deployment (or removing the
    report file being written) runs, and `reported` says what was kept (SIGHUP unless it is ignored, as under nohup).

    The handler only sets a flag (StopSignals), which the run looks at between its steps and while it waits (a
    deployment's start, a rate's requests: `should_stop`); in a `raising()` block it raises at once. An exception
    raised wherever the main thread was could land inside an HTTP client's connection-pool lock (a LoadProbe
    scrape, a readiness probe) and leave it held, and the `close()` in the `finally` then waited on it for good.
    The stop leaves the block as KeyboardInterrupt(signal name), also when it came after the run's last look."""
    if threading.current_thread() is not threading.main_thread():
        yield StopSignals(TERMINATION)  # installs nothing off the main thread: never set
        return
    with StopSignals(TERMINATION) as signals:
        try:
            yield signals
            signals.check()
        except StopRequested:
            raise KeyboardInterrupt(signals.signal_name) from None


def advice_from(cfg: CompareConfig, layout: Layout, pd: DeploymentRun) -> Advice | None:
    """The advisor's split from what the PD run measured; None when it measured no prefill or no decode step."""
    loads = [p.load for p in pd.points if p.load is not None]
    prefill = [x.prefill_tokens_per_s for x in loads if x.prefill_tokens_per_s]
    points = [DecodePoint(batch=x.decode_batch, step_ms=x.decode_step_ms) for x in loads
              if x.decode_batch and x.decode_step_ms]
    if not prefill or not points:
        return None
    max_num_seqs = deployment_config(cfg, layout, "pd").scheduler.max_num_seqs
    slo = cfg.slo_of(cfg.advise_for)
    advice = advise(num_gpus(layout), cfg.mean_input_len, cfg.output_len, slo.tpot_ms, max(prefill), points,
                    max_num_seqs, ttft_target_ms=slo.ttft_ms)
    advice.workloads = [w for point, doc in zip(pd.points, pd.raw)
                        if (w := _workload(point, doc, pd.prefill, max(prefill))) is not None]
    return advice


def _workload(point: RatePoint, doc: ServeDoc, prefill_gpus: int, tokens_per_s: float) -> Workload | None:
    """One rate of the PD run for the advisor's replay (its answered requests); None without per-request lists
    or a decode step time."""
    step_ms = point.load.decode_step_ms if point.load is not None else None
    columns = [doc.get(key) for key in ("start_times", "input_lens", "ttfts", "errors")]
    if step_ms is None or not all(isinstance(c, list) for c in columns):
        return None
    rows = [(float(t0), int(n), float(ttft)) for t0, n, ttft, err in zip(*columns)
            if not err and isinstance(t0, (int, float)) and isinstance(n, int) and isinstance(ttft, (int, float))]
    if not rows:
        return None
    first = min(t0 for t0, _, _ in rows)
    return workload(point.rate, [t0 - first for t0, _, _ in rows], [n for _, n, _ in rows], [t for _, _, t in rows],
                    max(1, prefill_gpus), tokens_per_s, step_ms)


class Comparison(BaseModel):
    """What `run_compare` measured: the deployments' runs, the advice, the prefill yardstick."""

    runs: list[DeploymentRun]
    advice: Advice | None
    yardstick: Yardstick


def baseline_runs(cfg: CompareConfig) -> list[DeploymentRun]:
    """With --baseline, its colocated and PD runs; every setting outside BASELINE_FREE must equal the baseline's
    (the same requests, SLOs and devices), else a PdlaunchError naming the first that differs."""
    if cfg.baseline is None:
        return []
    try:
        earlier = json.loads((cfg.baseline / "compare.json").read_text())["settings"]
        if not isinstance(earlier, dict):
            raise TypeError(f"compare.json's settings are {with_article(type(earlier).__name__)}, not a mapping")
        runs = [DeploymentRun.model_validate_json((cfg.baseline / f"{kind}.json").read_text()) for kind in KINDS]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PdlaunchError(f"could not read the baseline run in {cfg.baseline}: {exc}", field="--baseline",
                            hint="give the --out folder of an earlier `bench compare` that ran to its report") from None
    now = cfg.model_dump(mode="json")
    for name, value in now.items():
        if name not in BASELINE_FREE and earlier.get(name) != value:
            raise PdlaunchError(f"the baseline in {cfg.baseline} ran with {name} {earlier.get(name)!r}, this run "
                                f"with {value!r}", field="--baseline",
                                hint=f"run with the baseline's --{name.replace('_', '-')}, or without --baseline")
    return runs


def write_whole(path: Path, write: Callable[[IO[bytes]], object], hint: str) -> None:
    """report.write_atomic, with an OSError as a PdlaunchError naming --out and `path`, with `hint`."""
    try:
        write_atomic(path, write)
    except OSError as exc:
        raise PdlaunchError(f"could not write {str(path)!r}: {exc.strerror or exc}", field="--out",
                            hint=hint) from None


def write_json_whole(doc: JsonValue, path: Path, hint: str) -> None:
    text = json.dumps(doc, indent=2) + "\n"  # first: a value JSON cannot hold fails before any file exists
    write_whole(path, lambda file: file.write(text.encode()), hint)


def _keep(run: DeploymentRun, path: Path, kept: list[Path]) -> None:
    write_json_whole(run.model_dump(mode="json"), path, hint=f"the {run.kind} run's figures are not saved and the "
                     "comparison stops: free space, or give an --out you can write")
    kept.append(path)


def run_compare(cfg: CompareConfig, console: Console, kept: list[Path] | None = None) -> Comparison:
    """The matmul ceiling first (prefill_yardstick); then the deployments (`cfg.kinds`) in turn on the same devices,
    each stopped before the next starts (with --baseline, after the baseline's colocated and PD runs); then the
    advisor's split, when it differs from the PD split and `run_advised` (never with --baseline). Each
    deployment's figures are also written to OUT/<kind>.json as soon as it is done, its path added to `kept`
    (what an interrupted comparison leaves)."""
    kept = [] if kept is None else kept
    layout = resolve_layout(cfg)
    make_output_dir(cfg.out, "--out")  # before the configs, whose log_dir under it would be said as --log-dir
    said: list[Problem] = []  # each warning once, though every deployment's config is checked
    say_once(own_setting_warnings(cfg), said)
    for kind in cfg.kinds:  # fail on a config problem of any before spending time on the first
        deployment, warnings = checked_config(cfg, layout, kind)
        say_once(warnings, said)
        check_request_fits(cfg, deployment)
    check_sweep_fits(cfg)
    runs = baseline_runs(cfg)
    for run in runs:  # the out folder holds every deployment the report shows
        _keep(run, cfg.out / f"{run.kind}.json", kept)
    if runs:
        console.print(f"colocated and PD runs reused from {cfg.baseline} (the same workload, SLOs and devices)",
                      highlight=False, markup=False)
    with termination_as_interrupt() as stop:
        with stop.raising():  # its child is killed and reaped by subprocess.run, and no lock of ours is held
            yardstick = prefill_yardstick(cfg, layout, console)
        for kind in cfg.kinds:
            run = run_deployment(cfg, layout, kind, console, yardstick, should_stop=stop.requested.is_set)
            _keep(run, cfg.out / f"{kind}.json", kept)
            runs.append(run)
            stop.check()
        advice = advice_from(cfg, layout, next(run for run in runs if run.kind == "pd"))
        if advice is None:
            console.print("no P:D advice: the PD run measured no prefill or no decode step", highlight=False)
            return Comparison(runs=runs, advice=None, yardstick=yardstick)
        console.print(advice.sentence(), highlight=False)
        best = advice.best
        if advice.unmet is not None:  # no split to check: the report and compare.json say why (compare_advice.py)
            console.print(f"advised split not run: {skipped_because(advice, runs, cfg)}", highlight=False,
                          markup=False)
        elif cfg.run_advised and cfg.baseline is None and \
                (best.prefill, best.decode) != (layout.prefill, layout.decode):
            advised = advised_layout(layout, best.prefill, best.decode)
            say_once(checked_config(cfg, advised, "advised")[1], said)
            run = run_deployment(cfg, advised, "advised", console, yardstick, should_stop=stop.requested.is_set)
            _keep(run, cfg.out / "advised.json", kept)
            runs.append(run)
    return Comparison(runs=runs, advice=advice, yardstick=yardstick)
