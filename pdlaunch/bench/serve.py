"""`pdlaunch bench serve`: a load generator for any OpenAI-compatible server.

The workload (workload.py) sent at its arrival times, under an optional concurrency cap, each request streamed
(openai_client.py); then the report, the result JSON and plots. Timing and metric definitions: see report.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pdlaunch.bench.openai_client import CONNECT_TIMEOUT_S, resolve_model, send_request
from pdlaunch.bench.plots import require_matplotlib, write_plots
from pdlaunch.bench.report import (
    BenchMetrics,
    RequestResult,
    ServeDoc,
    calculate_metrics,
    parse_goodput,
    print_report,
    result_dict,
    write_json,
)
from pdlaunch.bench.serve_config import ServeBenchConfig
from pdlaunch.bench.served_length import check_fits_served
from pdlaunch.bench.workload import BenchRequest, arrival_times, sample_requests
from pdlaunch.bench.workload_size import check_workload_fits
from pdlaunch.config.rules.host import make_output_dir
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.serve import StopRequested

STOP_POLL_S = 0.1  # how soon a stop (measure's should_stop) ends the requests under way
_T = TypeVar("_T")


async def _run_requests(client: httpx.AsyncClient, cfg: ServeBenchConfig, model: str, requests: list[BenchRequest],
                        arrivals: np.ndarray, progress: Progress | None) -> tuple[list[RequestResult], float]:
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    task_id = progress.add_task("requests", total=len(requests)) if progress else None
    start = time.perf_counter()

    async def one(req: BenchRequest) -> RequestResult:
        if sem is None:
            res = await send_request(client, cfg, model, req, start)
        else:
            async with sem:
                res = await send_request(client, cfg, model, req, start)
        if progress is not None and task_id is not None:
            progress.advance(task_id)
        return res

    tasks = []
    for req, at in zip(requests, arrivals.tolist()):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - start


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """The timed run without the garbage collector's walks over what this process held before it: a full
    collection of a `bench compare` process's ~74k objects took ~30 ms on a 2-core CI host, and every stream's next
    token would read that much later (the instances and the proxy freeze theirs for the same reason,
    memory/heap.py). What the run itself creates is still collected. A process that froze its heap already (an
    engine built in it) keeps it frozen; otherwise the heap is walked again after the run."""
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()


async def _bench(cfg: ServeBenchConfig, console: Console) -> tuple[list[RequestResult], float, str]:
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    timeout = httpx.Timeout(cfg.request_timeout, connect=CONNECT_TIMEOUT_S)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=cfg.headers) as client:
        served = await resolve_model(client, cfg)  # before the workload is drawn: a wrong --base-url fails at once
        check_fits_served(cfg, served)
        model = served.name
        rng = np.random.default_rng(cfg.seed)
        requests = sample_requests(cfg, cfg.num_prompts, rng)
        arrivals = arrival_times(cfg.num_prompts, cfg.request_rate, cfg.burstiness, rng)
        if cfg.num_warmups:
            console.print(f"Warming up with {cfg.num_warmups} request(s) ...")
            warm = sample_requests(cfg, cfg.num_warmups, rng)
            warm_results, _ = await _run_requests(client, cfg, model, warm, np.zeros(len(warm)), None)
            if not any(r.success for r in warm_results):
                raise PdlaunchError(f"every warmup request failed; first error: {warm_results[0].error}",
                                    hint="check --model, --endpoint and the server log")
        rate = "inf" if math.isinf(cfg.request_rate) else f"{cfg.request_rate:g}"
        console.print(f"{cfg.num_prompts} requests to {escape(cfg.url)} (model {escape(model)}), rate {rate} req/s, "
                      f"burstiness {cfg.burstiness:g}, max concurrency {cfg.max_concurrency or 'none'}")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress, frozen_heap():
            results, duration = await _run_requests(client, cfg, model, requests, arrivals, progress)
    return results, duration, model


async def _unless_stopped(work: Awaitable[_T], should_stop: Callable[[], bool]) -> _T:
    """`work`'s result; once `should_stop()` turns true (looked at every STOP_POLL_S), `work` is cancelled, its
    cleanup awaited (its connections closed), and StopRequested raised."""
    task = asyncio.ensure_future(work)
    while not task.done():
        if should_stop():
            task.cancel()
            await asyncio.wait({task})
            raise StopRequested("stop requested while the requests ran")
        await asyncio.wait({task}, timeout=STOP_POLL_S)
    return task.result()


def measure(cfg: ServeBenchConfig, console: Console,
            should_stop: Callable[[], bool] = lambda: False) -> tuple[BenchMetrics, list[RequestResult], ServeDoc]:
    """Run the workload of `cfg` once; returns the metrics, per-request results and the JSON document.
    Prints only the progress line; a run where every request failed is returned, not raised. StopRequested,
    the requests cancelled, when `should_stop()` turns true meanwhile."""
    goodput_ms = parse_goodput(cfg.goodput)
    check_workload_fits(cfg)  # before the server is asked anything: the prompts are drawn before the run
    results, duration, model = asyncio.run(_unless_stopped(_bench(cfg, console), should_stop))
    metrics = calculate_metrics(results, duration, goodput_ms)
    run_info: ServeDoc = {
        "backend": "openai-chat" if cfg.is_chat else "openai",
        "base_url": cfg.base_url,
        "endpoint": cfg.endpoint,
        "model_id": model,
        "num_prompts": cfg.num_prompts,
        "random_input_len": cfg.random_input_len,
        "input_len_mix": [*cfg.input_lens] if cfg.input_lens is not None else None,
        "random_output_len": cfg.random_output_len,
        "random_range_ratio": cfg.random_range_ratio,
        "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "seed": cfg.seed,
        "goodput_slos_ms": {name: limit for name, limit in goodput_ms.items()},
    }
    return metrics, results, result_dict(metrics, results, run_info)


def prepare_outputs(cfg: ServeBenchConfig) -> None:
    """The result file's folder and the plot folder, created before the run: a path that cannot be written fails
    now, naming its flag, not once the run is over."""
    if cfg.save_result or cfg.result_filename:
        name = Path(cfg.result_filename or "result.json")
        flag = "--result-filename" if name.parent != Path(".") else "--result-dir"
        path = cfg.result_dir / name
        make_output_dir(path.parent, flag)
        if path.is_dir():
            raise PdlaunchError(f"{str(path)!r} is a folder", field="--result-filename",
                                hint="give the JSON file's name, e.g. result.json")
    if cfg.plot_dir is not None:
        make_output_dir(cfg.plot_dir, "--plot")


def save_result(cfg: ServeBenchConfig, doc: ServeDoc, path: Path) -> None:
    """Write the result JSON; an OSError (disk full, no permission) as an error naming the flag and the path. It comes
    after the report was printed, so the figures are on screen."""
    try:
        write_json(doc, path)
    except OSError as exc:
        flag = "--result-filename" if cfg.result_filename else "--result-dir"
        raise PdlaunchError(f"could not write the results to {str(path)!r}: {exc.strerror or exc}", field=flag,
                            hint="the report above has the figures; free space or give a path you can write") from None


def run_serve_bench(cfg: ServeBenchConfig, console: Console | None = None) -> ServeDoc:
    """Run the benchmark, print the report, save JSON/plots if asked; returns the JSON document."""
    console = console or Console()
    if cfg.plot_dir is not None:
        require_matplotlib()  # fail before the run, not after it
    prepare_outputs(cfg)
    metrics, results, doc = measure(cfg, console)
    print_report(console, metrics, results, parse_goodput(cfg.goodput))
    model = str(doc["model_id"])
    if cfg.save_result or cfg.result_filename:
        default_name = f"pdlaunch-{doc['request_rate']}qps-{model.replace('/', '_')}-{doc['date']}.json"
        name = cfg.result_filename or default_name
        path = cfg.result_dir / name
        save_result(cfg, doc, path)
        console.print(f"Saved results to {path}", markup=False)
    if cfg.plot_dir is not None and metrics.completed:
        for path in write_plots(results, cfg.plot_dir):
            console.print(f"Wrote {path}", markup=False)
    if not metrics.completed:
        raise PdlaunchError(f"all {cfg.num_prompts} requests failed; first error: {results[0].error}",
                            hint="check --base-url, --endpoint, --model and the server log")
    return doc
