"""Where `pdlaunch bench compare`'s deployments run and what each starts with: the devices and instance counts
(Layout), the validated deployment config of each kind, the checks made before the first one starts, and the
matmul ceiling of the prefill's device."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, JsonValue
from rich.console import Console
from rich.markup import escape

from pdlaunch.bench.compare_config import CompareConfig, DeploymentKind
from pdlaunch.bench.matmul_ceiling import Yardstick, measure_in_child
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.errors_format import short_repr
from pdlaunch.config.loader import checked_deployment, file_value, load_deployment
from pdlaunch.config.model_info import ModelInfo, load_model_info
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.proxy_config import ProxyConfig
from pdlaunch.config.yaml_strict import read_yaml
from pdlaunch.errors import ConfigError, PdlaunchError
from pdlaunch.launcher.ports import PortAllocator

logger = logging.getLogger(__name__)


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
    """The validated config of one deployment (the same validation as `pdlaunch serve`); its warnings are left to
    checked_config's caller, which says them once for the whole comparison."""
    return checked_config(cfg, layout, kind)[0]


def checked_config(cfg: CompareConfig, layout: Layout, kind: DeploymentKind
                   ) -> tuple[DeploymentConfig, list[Problem]]:
    """deployment_config's config and the warnings about it (none about the settings of _OWN: own_setting_warnings
    says those once)."""
    overrides: dict[str, JsonValue] = {
        "model.path": cfg.model, "device": layout.device, "colocated": kind == "colocated",
        "instances": _groups(kind, layout), "log_dir": str(cfg.out / "logs" / kind),
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
    overrides["proxy.port"] = _free_proxy_port(cfg, overrides)
    own = [*_OWN, *(_NO_DISAGGREGATION if kind == "colocated" else ())]
    try:
        deployment, warnings = checked_deployment(cfg.config, overrides, own)
    except ConfigError as exc:  # its problems name config paths; the user typed compare's flags and --config
        raise ConfigError([Problem(_flag_of(problem.field, kind, cfg), problem.message)
                           for problem in map(Problem._make, exc.problems)]) from None
    if kind in ("pd", "advised") and deployment.proxy.disaggregate_min_tokens is not None:
        raise PdlaunchError(
            f"the base config sets proxy.disaggregate_min_tokens: {deployment.proxy.disaggregate_min_tokens}, so the "
            "PD deployment would not disaggregate every request", field="--config",
            hint="drop it from the config and pass --disaggregate-min-tokens N: compare then runs always-PD and "
                 "per-request disaggregation side by side")
    return deployment, warnings


def _free_proxy_port(cfg: CompareConfig, overrides: dict[str, JsonValue]) -> int:
    """A free port on the address the deployment's proxy binds (proxy.host of --config): a proxy on 0.0.0.0 takes
    its port on every address of this machine, so one in use on any of them is not free for it. A config that does
    not load, or a proxy.host this machine cannot bind, gets a port on the default address: checked_deployment then
    says what is wrong, naming the key of --config."""
    try:
        host = load_deployment(cfg.config, overrides).proxy.host
    except ConfigError:
        host = ProxyConfig().host
    try:
        return PortAllocator(host).free("the proxy")
    except PdlaunchError as exc:
        if exc.field != "host":
            raise
        return PortAllocator(ProxyConfig().host).free("the proxy")


# config paths compare sets for each deployment whatever --config says, no flag of the user's, and how
_OWN = {"proxy.port": "its proxy on a free port", "log_dir": "its logs under --out (OUT/logs/<kind>)",
        "instances": "the instances of --prefill, --decode and --colocated-instances",
        "colocated": "colocated or prefill and decode instances by its kind"}
_NO_DISAGGREGATION = ("proxy.disaggregate_min_tokens", "proxy.disaggregate_max_queue_tokens",
                      "proxy.disaggregate_max_itl_ms")  # the colocated deployment's: none


def own_setting_warnings(cfg: CompareConfig) -> list[Problem]:
    """A warning for each setting of _OWN that the --config file makes: compare replaces it in every deployment,
    so this says so once (as a flag replacing it, it was said for every deployment, with serve's flag names)."""
    if cfg.config is None:
        return []
    try:
        raw = read_yaml(cfg.config)
    except ConfigError:  # said as the file's problems when the deployments are checked
        return []
    found = {path: value for path in _OWN if (value := file_value(raw, path)) is not None}
    return [problem(f"{path} (in --config)", f"compare starts each deployment with {_OWN[path]}, so "
                    f"{short_repr(in_file)} in {str(cfg.config)!r} is not used", "drop it from the file")
            for path, (_, in_file) in found.items()]


def say_once(warnings: list[Problem], said: list[Problem]) -> None:
    """Log each of `warnings` not in `said` (the comparison's so far) and add it there: every deployment's config
    is checked, mostly with the same warnings."""
    for warning in warnings:
        if warning not in said:
            said.append(warning)
            logger.warning("warning: %s: %s", warning.field, warning.message)


# config paths compare sets from its own flags (deployment_config's overrides)
_SET_BY_FLAG = {"model.path": "--model", "model.max_model_len": "--max-model-len",
                "proxy.request_timeout_seconds": "--request-timeout", "device": "--device", "log_dir": "--out"}


def _flag_of(path: str, kind: DeploymentKind, cfg: CompareConfig) -> str:
    """The flag that set config path `path` in `kind`'s deployment, else the key of the --config file (`path` as
    is when there is none)."""
    if path.startswith("instances"):
        return "--colocated-instances" if kind == "colocated" else "--prefill/--decode"
    if path in _SET_BY_FLAG:
        return _SET_BY_FLAG[path]
    if cfg.config is None:
        return path
    return "--config" if path == "config" else f"{path} (in --config)"


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
