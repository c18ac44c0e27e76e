"""`pdlaunch bench compare`: colocated instances, then a PD deployment, on the same devices in turn,
each driven through the same `bench serve` workload at every rate; then the P:D advisor (advisor.py) picks the
xPyD split of the GPUs from what the PD run measured, and that split runs too (unless it is the one just run).

Both deployments see the same requests: prompts, lengths and arrivals come from `seed + i` at the
i-th rate (fresh prompts per rate, so that prefix caching cannot serve a later rate from an earlier
one), identical for the two deployments. Every instance runs with TP 1, one per GPU.

With `--disaggregate-min-tokens N` a third deployment runs after the PD one: the same split with the proxy's
per-request disaggregation (`proxy.disaggregate_min_tokens`), so a mixed workload (`--input-lens 64,3072`) shows
it against both always-PD and colocated serving (issue 31's acceptance).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, Annotated, Literal

from pydantic import BaseModel, Field, JsonValue, field_validator, model_validator
from rich.console import Console
from rich.markup import escape

from pdlaunch.bench.advisor import Advice, DecodePoint, Workload, advise, workload
from pdlaunch.bench.engine_load import LONG_GAP_S, LoadProbe
from pdlaunch.bench.goodput import RatePoint, Slo, rate_point
from pdlaunch.bench.matmul_ceiling import Yardstick, measure_in_child
from pdlaunch.bench.report import ServeDoc, write_atomic
from pdlaunch.bench.serve import MAX_PROMPTS, MAX_TOKENS, MAX_VOCAB, ServeBenchConfig, measure
from pdlaunch.config.loader import load_valid_deployment
from pdlaunch.config.model_info import ModelInfo, load_model_info
from pdlaunch.config.models import DeploymentConfig, Role
from pdlaunch.config.rules.host import make_output_dir
from pdlaunch.errors import PdlaunchError
from pdlaunch.http.auth import internal_headers
from pdlaunch.launcher.deployment import READY_TIMEOUT_S, ChildExited, Deployment
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.launcher.serve import report_child_exit

DeploymentKind = Literal["colocated", "pd", "conditional", "advised"]
KINDS: tuple[DeploymentKind, ...] = ("colocated", "pd")
BASELINE_FILES = ("compare.json", "colocated.json", "pd.json")  # what --baseline reads of an earlier --out
# Settings a --baseline run may change: the per-request disaggregation deployment's own, and where and how long.
BASELINE_FREE = frozenset({"out", "baseline", "disaggregate_min_tokens", "disaggregate_max_queue_tokens",
                           "disaggregate_max_itl_ms", "run_advised", "advise_for", "request_timeout", "ready_timeout"})
SloSet = Literal["relaxed", "tight"]


class CompareConfig(BaseModel):
    """Every flag of `bench compare`; field names are the flag names (`input_len` -> `--input-len`)."""

    model: str
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus: list[int] | None = None  # None: GPUs 0 .. prefill+decode-1
    rates: list[float] = Field(min_length=1)  # requests/s
    # the bounds of `bench serve`'s flags (ServeBenchConfig), checked here before any deployment starts
    num_prompts: int = Field(160, ge=1, le=MAX_PROMPTS)
    # seconds of arrivals per rate: each rate sends round(rate x duration) requests instead of num_prompts, so a
    # high rate is measured over as long a stretch as a low one
    duration: float | None = Field(None, gt=0, allow_inf_nan=False)
    input_len: int = Field(3072, ge=1, le=MAX_TOKENS)
    # a mix; replaces input_len
    input_lens: list[Annotated[int, Field(ge=1, le=MAX_TOKENS)]] | None = Field(None, min_length=1)
    output_len: int = Field(128, ge=1, le=MAX_TOKENS)
    ttft_slo_ms: float = Field(400.0, gt=0)
    tpot_slo_ms: float = Field(15.0, gt=0)
    tight_ttft_slo_ms: float = Field(1000.0, gt=0)
    tight_tpot_slo_ms: float = Field(10.0, gt=0)
    advise_for: SloSet = "relaxed"  # whose TPOT target sizes the decode side
    run_advised: bool = True  # run the advised split when it is not the PD split already run
    colocated_instances: int | None = Field(None, ge=1)  # None: one per GPU (CPU: prefill + decode)
    disaggregate_min_tokens: int | None = Field(None, ge=1)  # also run PD with per-request disaggregation
    # ... and in that deployment, spill PD prompts to the decode while the prefill queue holds this many tokens
    disaggregate_max_queue_tokens: int | None = Field(None, ge=1)
    # ... and no prompt on a decode whose streams wait this many ms per token (proxy.disaggregate_max_itl_ms)
    disaggregate_max_itl_ms: float | None = Field(None, gt=0, allow_inf_nan=False)
    prefill: int = Field(1, ge=1)
    decode: int = Field(1, ge=1)
    burstiness: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    num_warmups: int = Field(2, ge=0, le=MAX_PROMPTS)
    vocab_size: int = Field(500, gt=10, le=MAX_VOCAB)
    max_model_len: int | None = Field(None, ge=1)
    config: Path | None = None  # base deployment YAML; its instances/colocated are replaced
    # an earlier run's --out with the same workload: its colocated and PD runs are reused, only "conditional" runs
    baseline: Path | None = None
    request_timeout: float = Field(600.0, gt=0)
    ready_timeout: float = Field(READY_TIMEOUT_S, gt=0)
    out: Path

    @field_validator("rates")
    @classmethod
    def _positive_rates(cls, rates: list[float]) -> list[float]:
        bad = [r for r in rates if not (r > 0 and math.isfinite(r))]
        if bad:
            raise ValueError(f"every rate must be a positive, finite number of requests/s; got {bad[0]:g}")
        if len(set(rates)) != len(rates):
            raise ValueError("a rate is listed twice")
        return sorted(rates)

    @model_validator(mode="after")
    def _check_model(self) -> CompareConfig:
        if self.model not in ("demo", "tiny") and not Path(os.path.expanduser(self.model)).exists():
            raise ValueError(f"--model: {self.model!r} does not exist (give a local HF checkpoint, a .gguf file, "
                             "`demo` or `tiny`)")
        if self.config is not None and not self.config.is_file():
            raise ValueError(f"--config: {str(self.config)!r} is not a file")
        if self.input_lens is not None and self.input_len != type(self).model_fields["input_len"].default:
            raise ValueError("--input-len and --input-lens both set the prompt lengths: give one")
        if self.duration is not None and self.num_prompts != type(self).model_fields["num_prompts"].default:
            raise ValueError("--num-prompts and --duration both set how many requests a rate sends: give one")
        if self.duration is not None and self.prompts_at(len(self.rates) - 1) > MAX_PROMPTS:
            raise ValueError(f"--duration: {self.duration:g} s at {self.rates[-1]:g} req/s is "
                             f"{self.prompts_at(len(self.rates) - 1)} requests, more than {MAX_PROMPTS}; "
                             "give a shorter --duration")
        if self.disaggregate_max_queue_tokens is not None and self.disaggregate_min_tokens is None:
            raise ValueError("--disaggregate-max-queue-tokens applies to the per-request disaggregation "
                             "deployment: give --disaggregate-min-tokens N too")
        if self.disaggregate_max_itl_ms is not None and self.disaggregate_min_tokens is None:
            raise ValueError("--disaggregate-max-itl-ms applies to the per-request disaggregation "
                             "deployment: give --disaggregate-min-tokens N too")
        if self.baseline is not None:
            if self.disaggregate_min_tokens is None:
                raise ValueError("--baseline reuses an earlier run's colocated and PD deployments and runs only the "
                                 "per-request disaggregation one: give --disaggregate-min-tokens N too")
            missing = [name for name in BASELINE_FILES if not (self.baseline / name).is_file()]
            if missing:
                raise ValueError(f"--baseline: {str(self.baseline)!r} has no {missing[0]} (give the --out folder of "
                                 "an earlier `bench compare` that ran to its report)")
        return self

    def prompts_at(self, index: int) -> int:
        """Requests the rate at `index` sends: --num-prompts, or rate x --duration (at least one)."""
        if self.duration is None:
            return self.num_prompts
        return max(1, round(self.rates[index] * self.duration))

    @property
    def prompt_lens(self) -> list[int]:
        """The workload's prompt lengths: the mix of --input-lens, or --input-len alone."""
        return [*self.input_lens] if self.input_lens is not None else [self.input_len]

    @property
    def mean_input_len(self) -> int:
        """Prompt tokens per request, averaged over the mix (its lengths come in equal shares)."""
        return round(sum(self.prompt_lens) / len(self.prompt_lens))

    @property
    def kinds(self) -> tuple[DeploymentKind, ...]:
        """The deployments run before the advised one: colocated, PD, and PD with per-request disaggregation
        (with --baseline only the last: the others are the baseline's)."""
        if self.baseline is not None:
            return ("conditional",)
        return KINDS + (("conditional",) if self.disaggregate_min_tokens is not None else ())

    @property
    def slo(self) -> Slo:
        return Slo(ttft_ms=self.ttft_slo_ms, tpot_ms=self.tpot_slo_ms)

    @property
    def tight_slo(self) -> Slo:
        return Slo(ttft_ms=self.tight_ttft_slo_ms, tpot_ms=self.tight_tpot_slo_ms)

    def slo_of(self, which: SloSet) -> Slo:
        return self.slo if which == "relaxed" else self.tight_slo


class Layout(BaseModel):
    """Where the two deployments run: resolved device, GPUs, instance counts."""

    device: Literal["cpu", "cuda"]
    gpus: list[int]  # empty on CPU
    colocated: int
    prefill: int
    decode: int


def resolve_layout(cfg: CompareConfig) -> Layout:
    """Check the devices against this machine. Raises PdlaunchError naming the flag."""
    from pdlaunch.memory import platform

    device = "cpu" if cfg.device == "cpu" else platform.resolve_device(cfg.device)
    if cfg.device == "cuda" and not platform.cuda_available():
        raise PdlaunchError("no CUDA device is visible on this machine", field="--device", hint="use --device cpu")
    pd_count = cfg.prefill + cfg.decode
    if device == "cpu":
        if cfg.gpus is not None:
            raise PdlaunchError("GPUs were listed but the deployments run on CPU", field="--gpus",
                                hint="drop --gpus, or pass --device cuda on a GPU host")
        return Layout(device="cpu", gpus=[], colocated=cfg.colocated_instances or pd_count,
                      prefill=cfg.prefill, decode=cfg.decode)
    visible = platform.device_count()
    gpus = cfg.gpus if cfg.gpus is not None else list(range(pd_count))
    for gpu in gpus:
        if not 0 <= gpu < visible:
            raise PdlaunchError(f"GPU {gpu} does not exist (this machine has {visible}: 0..{visible - 1})",
                                field="--gpus", hint="list visible GPU indices, e.g. --gpus 0,1")
    if len(set(gpus)) != len(gpus):
        raise PdlaunchError("a GPU is listed twice", field="--gpus", hint="list each GPU once")
    if pd_count != len(gpus):
        raise PdlaunchError(f"{cfg.prefill} prefill + {cfg.decode} decode instances need {pd_count} GPUs, "
                            f"--gpus lists {len(gpus)}", field="--gpus",
                            hint="both deployments run one instance per listed GPU: make --prefill + --decode "
                                 "equal the number of GPUs")
    colocated = cfg.colocated_instances or len(gpus)
    if colocated != len(gpus):
        raise PdlaunchError(f"{colocated} colocated instances on {len(gpus)} GPUs", field="--colocated-instances",
                            hint="on GPUs the colocated deployment is one instance per listed GPU; drop the flag")
    return Layout(device="cuda", gpus=gpus, colocated=colocated, prefill=cfg.prefill, decode=cfg.decode)


def _groups(kind: DeploymentKind, layout: Layout) -> list[JsonValue]:
    def group(role: str, count: int, first: int) -> dict[str, JsonValue]:
        g: dict[str, JsonValue] = {"role": role, "count": count, "tp": 1}
        if layout.device == "cuda":
            g["devices"] = [*layout.gpus[first:first + count]]
        return g

    if kind == "colocated":
        return [group("colocated", layout.colocated, 0)]
    return [group("prefill", layout.prefill, 0), group("decode", layout.decode, layout.prefill)]


def label(kind: DeploymentKind, layout: Layout) -> str:
    """Short name for the table: `colocated x2`, `PD 1P1D`, `PD 2P1D adv.`."""
    if kind == "colocated":
        return f"colocated x{layout.colocated}"
    return f"PD {layout.prefill}P{layout.decode}D" + {"advised": " adv.", "conditional": " cond."}.get(kind, "")


def num_gpus(layout: Layout) -> int:
    """What the advisor splits: the GPUs (on CPU, the PD deployment's instance count)."""
    return len(layout.gpus) if layout.device == "cuda" else layout.prefill + layout.decode


def advised_layout(layout: Layout, prefill: int, decode: int) -> Layout:
    return layout.model_copy(update={"prefill": prefill, "decode": decode})


def describe(kind: DeploymentKind, layout: Layout, min_tokens: int | None = None,
             max_queue: int | None = None, max_itl_ms: float | None = None) -> str:
    """`min_tokens`, `max_queue`, `max_itl_ms`: the conditional deployment's --disaggregate-min-tokens,
    --disaggregate-max-queue-tokens and --disaggregate-max-itl-ms."""
    def where(gpus: list[int]) -> str:
        return f"GPU {','.join(map(str, gpus))}" if layout.device == "cuda" else "CPU"

    if kind == "colocated":
        return f"{layout.colocated} colocated ({where(layout.gpus)})"
    split = (f"{layout.prefill}P ({where(layout.gpus[:layout.prefill])}) + "
             f"{layout.decode}D ({where(layout.gpus[layout.prefill:])})")
    if kind != "conditional":
        return split
    spill = f", and all while the prefill queue holds >= {max_queue} tokens" if max_queue is not None else ""
    busy = f", none while its streams wait >= {max_itl_ms:g} ms a token" if max_itl_ms is not None else ""
    return split + f", prompts of < {min_tokens} uncached tokens on the decode alone{spill}{busy}"


def deployment_config(cfg: CompareConfig, layout: Layout, kind: DeploymentKind) -> DeploymentConfig:
    """The validated config of one deployment (the same validation as `pdlaunch serve`)."""
    overrides: dict[str, JsonValue] = {
        "model.path": cfg.model, "device": layout.device, "colocated": kind == "colocated",
        "instances": _groups(kind, layout), "log_dir": str(cfg.out / "logs" / kind),
        "proxy.port": PortAllocator("127.0.0.1").free("the proxy"),
        # the client gives up on a request after --request-timeout; the proxy must not give up first
        "proxy.request_timeout_seconds": cfg.request_timeout + 30.0,
    }
    if cfg.max_model_len is not None:
        overrides["model.max_model_len"] = cfg.max_model_len
    if kind == "conditional":
        overrides["proxy.disaggregate_min_tokens"] = cfg.disaggregate_min_tokens
        overrides["proxy.disaggregate_max_queue_tokens"] = cfg.disaggregate_max_queue_tokens
        overrides["proxy.disaggregate_max_itl_ms"] = cfg.disaggregate_max_itl_ms
    elif kind == "colocated":  # colocated instances never disaggregate: a base config's setting is not theirs
        overrides["proxy.disaggregate_min_tokens"] = None
        overrides["proxy.disaggregate_max_queue_tokens"] = None
        overrides["proxy.disaggregate_max_itl_ms"] = None
    deployment = load_valid_deployment(cfg.config, overrides)
    if kind in ("pd", "advised") and deployment.proxy.disaggregate_min_tokens is not None:
        raise PdlaunchError(
            f"the base config sets proxy.disaggregate_min_tokens: {deployment.proxy.disaggregate_min_tokens}, so the "
            "PD deployment would not disaggregate every request", field="--config",
            hint="drop it from the config and pass --disaggregate-min-tokens N: compare then runs always-PD and "
                 "per-request disaggregation side by side")
    return deployment


def _model_info(deployment: DeploymentConfig) -> ModelInfo:
    info, problems = load_model_info(deployment.model.path)
    if info is None:  # the deployment validated, so this is a checkpoint changed since
        raise PdlaunchError(problems[0].message if problems else "no usable config.json", field="--model")
    return info


def check_request_fits(cfg: CompareConfig, deployment: DeploymentConfig) -> None:
    """--input-len (the longest of --input-lens) + --output-len must fit the deployment's max_model_len: said
    before anything starts, not as every request failing once the first deployment is up."""
    limit = deployment.model.max_model_len or _model_info(deployment).max_position_embeddings
    longest = max(cfg.prompt_lens)
    need = longest + cfg.output_len
    flag = "--input-lens" if cfg.input_lens is not None else "--input-len"
    if limit is not None and need > limit:
        raise PdlaunchError(
            f"{flag} {longest} + --output-len {cfg.output_len} = {need} exceeds the model's "
            f"max_model_len {limit} ({deployment.model.path})", field=flag,
            hint=f"pass prompts of {max(1, limit - cfg.output_len)} tokens or fewer with this --output-len")


def prefill_yardstick(cfg: CompareConfig, layout: Layout, console: Console) -> Yardstick:
    """FLOPs per prompt token of the workload, and the matmul ceiling of the device the prefill runs on (the
    first listed GPU, or the CPU), in the deployment's dtype, measured now: before any deployment starts."""
    deployment = deployment_config(cfg, layout, "pd")
    info = _model_info(deployment)
    flops = sum(info.prefill_flops(n) for n in cfg.prompt_lens) / sum(cfg.prompt_lens)  # per token of the mix
    dtype = deployment.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if layout.device == "cuda" else "float32"
    gpu = layout.gpus[0] if layout.gpus else 0
    try:
        ceiling = measure_in_child(layout.device, gpu, dtype)
    except PdlaunchError as exc:
        console.print(f"[yellow]no matmul ceiling: {escape(exc.render())}; prefill FLOP rates are shown without their "
                      "share of it[/yellow]", highlight=False)
        return Yardstick(input_len=cfg.mean_input_len, flops_per_token=flops, no_ceiling=exc.render())
    console.print(f"matmul ceiling: {ceiling.n}^3 {ceiling.dtype} on {escape(ceiling.device)}: {ceiling.tflops:.3g} "
                  f"TFLOP/s; the workload's prefill: {flops / 1e9:.3g} GFLOP per prompt token", highlight=False)
    return Yardstick(input_len=cfg.mean_input_len, flops_per_token=flops, ceiling=ceiling)


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


def bench_config(cfg: CompareConfig, base_url: str, index: int) -> ServeBenchConfig:
    lengths = {"input_lens": cfg.input_lens} if cfg.input_lens is not None else {"random_input_len": cfg.input_len}
    return ServeBenchConfig(
        base_url=base_url, num_prompts=cfg.prompts_at(index), **lengths,
        random_output_len=cfg.output_len, request_rate=cfg.rates[index], burstiness=cfg.burstiness,
        num_warmups=cfg.num_warmups, goodput=cfg.slo.as_goodput_specs(), vocab_size=cfg.vocab_size,
        ignore_eos=True, seed=cfg.seed + index, request_timeout=cfg.request_timeout,
    )


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
                   yardstick: Yardstick | None = None) -> DeploymentRun:
    """Start one deployment, drive every rate through it, stop it (also on error or Ctrl-C). With a
    `yardstick`, every rate point carries its prefill steps' FLOP rate."""
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
        deployment.start(ready_timeout=cfg.ready_timeout)
        if deployment.proxy_url is None:
            raise PdlaunchError("the deployment has no proxy on this node", field="--config",
                                hint="compare runs on one node; drop parallel.nodes from the config")
        if kind == "conditional":  # how many requests of each rate ran on a decode alone
            probe.proxy_url = deployment.proxy_url
        for i, rate in enumerate(cfg.rates):
            stage = f"failed at rate {rate:g}/s"
            probe.start()
            _, _, doc = measure(bench_config(cfg, deployment.proxy_url, i), console)
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
        # A rate's error names `bench serve`'s flags (--base-url), which compare has not: only start keeps its field.
        raise PdlaunchError(f"the {kind} deployment ({run.description}) {stage}: {exc.message}",
                            field=exc.field if stage == "did not start" else None, hint=exc.hint) from None
    finally:
        run.pids = [c.pid for c in deployment.children if c.pid is not None]  # those a failed start left, too
        probe.close()
        deployment.stop(drain=clean)
        run.stopped = all(c.poll() is not None for c in deployment.children)
        console.print(f"{kind} deployment stopped: {len(run.pids)} processes reaped" if run.stopped
                      else f"[red]{kind} deployment: a child did not stop[/red]", highlight=False)
    return run


@contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so that the `finally` stopping the deployment (or removing the report file
    being written) runs (SIGHUP unless it is ignored, as under nohup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # A SIGHUP ignored (nohup) stays ignored: a closed terminal must not stop a long comparison.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)
                if not (sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
            raise TypeError(f"compare.json's settings are a {type(earlier).__name__}, not a mapping")
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
    for kind in cfg.kinds:  # fail on a config problem of any before spending time on the first
        check_request_fits(cfg, deployment_config(cfg, layout, kind))
    runs = baseline_runs(cfg)
    for run in runs:  # the out folder holds every deployment the report shows
        _keep(run, cfg.out / f"{run.kind}.json", kept)
    if runs:
        console.print(f"colocated and PD runs reused from {cfg.baseline} (the same workload, SLOs and devices)",
                      highlight=False, markup=False)
    with termination_as_interrupt():
        yardstick = prefill_yardstick(cfg, layout, console)
        for kind in cfg.kinds:
            run = run_deployment(cfg, layout, kind, console, yardstick)
            _keep(run, cfg.out / f"{kind}.json", kept)
            runs.append(run)
        advice = advice_from(cfg, layout, next(run for run in runs if run.kind == "pd"))
        if advice is None:
            console.print("no P:D advice: the PD run measured no prefill or no decode step", highlight=False)
            return Comparison(runs=runs, advice=None, yardstick=yardstick)
        console.print(advice.sentence(), highlight=False)
        best = advice.best
        if cfg.run_advised and cfg.baseline is None and (best.prefill, best.decode) != (layout.prefill, layout.decode):
            run = run_deployment(cfg, advised_layout(layout, best.prefill, best.decode), "advised", console,
                                 yardstick)
            _keep(run, cfg.out / "advised.json", kept)
            runs.append(run)
    return Comparison(runs=runs, advice=advice, yardstick=yardstick)
