"""One deployment of `pdlaunch bench compare` through every rate: started, driven with the same `bench serve`
workload at each rate (fresh prompts per rate, from `seed + i` at the i-th), stopped whatever ends the run; one
line per rate, and the figures kept as a DeploymentRun."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

from pdlaunch.bench.compare_config import CompareConfig, DeploymentKind
from pdlaunch.bench.compare_layout import Layout, deployment_config, describe, label
from pdlaunch.bench.engine_load import LONG_GAP_S, LoadProbe
from pdlaunch.bench.goodput import RatePoint, rate_point
from pdlaunch.bench.matmul_ceiling import Yardstick
from pdlaunch.bench.report import ServeDoc
from pdlaunch.bench.serve import measure
from pdlaunch.bench.serve_config import ServeBenchConfig
from pdlaunch.bench.workload_size import check_workload_fits
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.strict_model import Role
from pdlaunch.errors import PdlaunchError
from pdlaunch.http.auth import internal_headers
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.readiness import ChildExited
from pdlaunch.launcher.serve import StopRequested, report_child_exit


class StepLimits(BaseModel):
    """What one step of an instance of the deployment may compute (SchedulerConfig): the step's tokens, and its
    prompt tokens when the step also runs decodes (0: no such cap). A colocated baseline is only as honest as
    these, so the report keeps them."""
    max_num_batched_tokens: int
    prompt_tokens_while_decoding: int


class DeploymentRun(BaseModel):
    kind: DeploymentKind
    label: str
    description: str
    prefill: int = 0  # the split (PD kinds)
    decode: int = 0
    steps: dict[str, StepLimits] = {}  # by instance role
    pids: list[int] = []  # every child process (instances and proxy)
    stopped: bool = False  # every child ended and was reaped
    points: list[RatePoint] = []
    raw: list[ServeDoc] = []  # the `bench serve` result document per rate


def bench_config(cfg: CompareConfig, base_url: str, index: int, api_key: str | None = None) -> ServeBenchConfig:
    """The `bench serve` run of rate `index` against `base_url`; `api_key`: the deployment's security.api_key (a
    --config that sets one: its proxy refuses requests without it)."""
    lengths = {"input_lens": cfg.input_lens} if cfg.input_lens is not None else {"random_input_len": cfg.input_len}
    return ServeBenchConfig(
        base_url=base_url, api_key=api_key, num_prompts=cfg.prompts_at(index), **lengths,
        random_output_len=cfg.output_len, request_rate=cfg.rates[index], burstiness=cfg.burstiness,
        num_warmups=cfg.num_warmups, goodput=cfg.slo.as_goodput_specs(), vocab_size=cfg.vocab_size,
        ignore_eos=True, seed=cfg.seed + index, request_timeout=cfg.request_timeout,
    )


def check_sweep_fits(cfg: CompareConfig) -> None:
    """Every rate's workload fits in the memory available (workload_size.py), checked before any deployment starts;
    the flags named are `bench compare`'s."""
    for index in range(len(cfg.rates)):
        check_workload_fits(bench_config(cfg, "http://127.0.0.1", index),  # the URL sizes nothing
                            "--duration" if cfg.duration is not None else "--num-prompts",
                            "--input-lens" if cfg.input_lens is not None else "--input-len")


def _latencies_text(point: RatePoint) -> str:
    """"TTFT p50 X ms, TPOT p50 Y ms, ITL p99 Z ms"; none without a completed request (`bench serve` says 0 then)."""
    if not point.completed:
        return "no latencies (no request completed)"
    return (f"TTFT p50 {point.ttft_p50_ms:.0f} ms, TPOT p50 {point.tpot_p50_ms:.1f} ms, "
            f"ITL p99 {point.itl_p99_ms:.1f} ms")


def _gaps_text(point: RatePoint) -> str:
    """", N token gaps >= 50 ms (M at the instances, K slow decode steps)": where the streams' long stalls arose
    (engine_load.py)."""
    load = point.load
    at_instances = round(load.long_token_gaps) if load is not None else None
    slow = round(load.slow_decode_steps) if load is not None else 0
    if not point.long_itl_gaps and not at_instances and not slow:
        return ""
    steps = f", {slow} slow decode steps" if slow else ""
    where = f" ({at_instances} at the instances{steps})" if at_instances is not None else ""
    return f", {point.long_itl_gaps} token gaps >= {LONG_GAP_S * 1000:g} ms{where}"


def _failed_text(point: RatePoint, doc: ServeDoc) -> str:
    """", N of M requests failed (first: ERROR)": compare prints no `bench serve` report, and the latencies of a
    rate are those of its answered requests alone."""
    errors = doc.get("errors")
    first = next((e for e in errors if isinstance(e, str) and e), "") if isinstance(errors, list) else ""
    failed = point.num_prompts - point.completed
    if not failed:
        return ""
    return f", {failed} of {point.num_prompts} requests failed" + (f" (first: {escape(first[:200])})" if first else "")


def _decisions_text(point: RatePoint) -> str:
    decisions = point.load.decisions if point.load is not None else None
    if not decisions:
        return ""
    spilled = f" ({decisions['spilled']} spilled from a full prefill queue)" if decisions.get("spilled") else ""
    alone = decisions.get("decode_only", 0) + decisions.get("spilled", 0)
    busy = decisions.get("pd_decode_busy", 0)
    busy_text = f" ({busy} of them because the decode had no TPOT headroom)" if busy else ""
    return f", {alone} on a decode alone{spilled} and {decisions.get('pd', 0) + busy} PD{busy_text}"


def step_limits(config: DeploymentConfig, kind: DeploymentKind) -> dict[str, StepLimits]:
    """The step limits of each instance role the deployment runs."""
    roles: tuple[Role, ...] = ("colocated",) if kind == "colocated" else ("prefill", "decode")
    return {role: StepLimits(max_num_batched_tokens=config.scheduler.token_budget(role),
                             prompt_tokens_while_decoding=config.scheduler.prompt_tokens_while_decoding)
            for role in roles}


def steps_text(steps: dict[str, StepLimits]) -> str:
    """E.g. "colocated 8192 tokens, 1024 prompt tokens beside decodes" (a prefill instance never decodes)."""
    def one(role: str, limits: StepLimits) -> str:
        cap = limits.prompt_tokens_while_decoding
        capped = role != "prefill" and 0 < cap < limits.max_num_batched_tokens
        beside = f", {cap} prompt tokens beside decodes" if capped else ""
        return f"{role} {limits.max_num_batched_tokens} tokens{beside}"
    return "; ".join(one(role, limits) for role, limits in steps.items())


def run_deployment(cfg: CompareConfig, layout: Layout, kind: DeploymentKind, console: Console,
                   yardstick: Yardstick | None = None,
                   should_stop: Callable[[], bool] = lambda: False) -> DeploymentRun:
    """Start one deployment, drive every rate through it, stop it (also on error or Ctrl-C). With a
    `yardstick`, every rate point carries its prefill steps' FLOP rate. Once `should_stop()` turns true (a stop
    signal, compare.termination_as_interrupt) the start or the rate under way ends, the deployment is stopped and
    StopRequested raised; it is looked at while waiting and between steps, never raised inside an HTTP call."""
    run = DeploymentRun(kind=kind, label=label(kind, layout),
                        description=describe(kind, layout, cfg.disaggregate_min_tokens,
                                             cfg.disaggregate_max_queue_tokens, cfg.disaggregate_max_itl_ms),
                        prefill=layout.prefill if kind != "colocated" else 0,
                        decode=layout.decode if kind != "colocated" else 0)
    config = deployment_config(cfg, layout, kind)
    run.steps = step_limits(config, kind)
    console.rule(f"{kind}: {run.description}")
    console.print(f"steps: {steps_text(run.steps)}", highlight=False)
    deployment = Deployment(config, console)
    probe = LoadProbe([(p.spec.role, p.url) for p in deployment.plan.instances],
                      internal_headers(deployment.cfg.security.deployment_secret))
    clean = False
    stage = "did not start"  # what the error of a failed run says the deployment was doing
    try:
        if not deployment.start(ready_timeout=cfg.ready_timeout, should_stop=should_stop):
            raise StopRequested("stop requested while the deployment started")
        if deployment.proxy_url is None:
            raise PdlaunchError("the deployment has no proxy on this node", field="--config",
                                hint="compare runs on one node; drop parallel.nodes from the config")
        if kind == "conditional":  # how many requests of each rate ran on a decode alone
            probe.proxy_url = deployment.proxy_url
        for i, rate in enumerate(cfg.rates):
            stage = f"failed at rate {rate:g}/s"
            if should_stop():
                raise StopRequested(f"stop requested before rate {rate:g}/s")
            probe.start()
            _, _, doc = measure(bench_config(cfg, deployment.proxy_url, i, deployment.cfg.security.api_key), console,
                                should_stop)
            dead = deployment.dead_child()  # figures of a rate that lost a process would mislead
            if dead is not None:
                raise ChildExited(*dead)
            point = rate_point(rate, doc, cfg.slo, cfg.tight_slo, probe.stop())
            if yardstick is not None and point.load is not None:
                point.prefill_compute = yardstick.share(point.load.prefill_tokens_per_s)
            run.points.append(point)
            run.raw.append(doc)
            console.print(f"  rate {rate:g}/s: goodput {point.goodput:.2f}/s (tight {point.tight_goodput:.2f}/s), "
                          f"served {point.served:.2f}/s, {point.within_slo}/{point.num_prompts} within SLOs, "
                          f"{_latencies_text(point)}{_gaps_text(point)}{_decisions_text(point)}"
                          f"{_failed_text(point, doc)}",
                          highlight=False)
        clean = True
    except ChildExited as exc:
        report_child_exit(console, exc)
        raise PdlaunchError(f"the {kind} deployment lost a process: {exc.message}",
                            hint=f"its log: {exc.child.log_path}") from None
    except PdlaunchError as exc:
        # A rate's error and its hint name `bench serve`'s flags (--base-url; 'check --model, --endpoint and the server
        # log' when every warmup failed), which compare has not or means otherwise: only start keeps both.
        started = stage != "did not start"
        raise PdlaunchError(f"the {kind} deployment ({run.description}) {stage}: {exc.message}",
                            field=None if started else exc.field,
                            hint=f"the deployment's logs: {config.log_dir}" if started else exc.hint) from None
    finally:
        run.pids = [c.pid for c in deployment.children if c.pid is not None]  # those a failed start left, too
        probe.close()
        deployment.stop(drain=clean)
        run.stopped = all(c.poll() is not None for c in deployment.children)
        console.print(f"{kind} deployment stopped: {len(run.pids)} processes reaped" if run.stopped
                      else f"[red]{kind} deployment: a child did not stop[/red]", highlight=False)
    return run
