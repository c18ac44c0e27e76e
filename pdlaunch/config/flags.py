"""Serve flags shared by `serve`, `check-config` and `smoke`, and where each lands in the config.

Every flag has a YAML key: SERVE_FLAGS declares each flag once (name, type, config path, help);
FLAG_PATHS maps the flag's parameter name to its dotted config path. vLLM's spellings that mean the
same thing (`--tensor-parallel-size`, `-tp`) are flags of their own on the same path, so that a
problem names the spelling the user typed; vLLM's spellings that mean something else here are
refused with what we call it. `--prefill N` / `--decode N` set the count of the instance group with that role.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, TypeVar, cast

import typer

from pdlaunch.config.cli_overrides import Overrides, split_positionals
from pdlaunch.config.launcher_config import SECRET_PATHS
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.vllm_kv_transfer import kv_transfer_overrides


@dataclass(frozen=True)
class Flag:
    """One serve flag: its parameter name (`--prefill-tp` is `prefill_tp`), its type, the dotted
    config path it overrides, its help text and, for secrets, the environment variable it reads.
    `spelling` replaces the option derived from the name (`-tp`, an on/off pair); `refused` is the
    hint given when a spelling that means something else here is used."""

    name: str
    type: type | UnionType  # `bool`, `str | None`, ...: the typer parameter's annotation
    path: str
    help: str
    envvar: str | None = None
    spelling: str | None = None
    refused: str | None = None
    refused_why: str = "means something else in pdlaunch"
    sets: bool | None = None  # for an on/off flag of its own (`--no-enable-prefix-caching`): the value it sets
    metavar: str | None = None  # what --help shows for the value (default: from the type)

    @property
    def declaration(self) -> str:
        return self.spelling or "--" + self.name.replace("_", "-")

    @property
    def option(self) -> str:
        """The spelling a problem names (the `on` half of an on/off pair)."""
        return self.declaration.split("/")[0]


R = TypeVar("R")
KV_TRANSFER_CONFIG = "vllm.kv_transfer_config"  # not a config path: read into kv_transfer.* by vllm_kv_transfer
# Flags typed as str so that a bad value reaches our validation (field named, fix hinted)
# instead of click's own message.
SERVE_FLAGS: tuple[Flag, ...] = (
    Flag("model", str | None, "model.path",
         "HF checkpoint directory, FILE.gguf, `demo` (SmolLM2-135M-Instruct) or `tiny` (or the positional MODEL)."),
    Flag("device", str | None, "device", "auto | cpu | cuda."),
    Flag("host", str | None, "proxy.host", "Proxy bind address."),
    Flag("port", int | None, "proxy.port", "Proxy port."),
    Flag("proxy_workers", str | None, "proxy.workers",
         "Proxy processes sharing the port: auto (default: one per 8 usable CPUs, 1 to 4) or 1 to 64; each routes "
         "on its own.", metavar="auto|N"),
    Flag("drain_timeout_seconds", float | None, "supervision.drain_timeout_seconds",
         "On Ctrl-C / SIGTERM, seconds the proxy lets requests in flight finish (then 503 shutting_down) before "
         "the instances stop (default 5, at most 3600).", metavar="<s>"),
    Flag("routing_policy", str | None, "proxy.routing_policy",
         "round_robin | least_loaded | prefix (the instance caching the longest prefix of the prompt, weighed "
         "against its queue)."),
    Flag("disaggregate_min_tokens", int | None, "proxy.disaggregate_min_tokens",
         "Prompts of fewer tokens run on a decode instance alone (no prefill leg, no KV transfer)."),
    Flag("disaggregate_max_queue_tokens", int | None, "proxy.disaggregate_max_queue_tokens",
         "While every prefill has this many prompt tokens queued, prompts that would go PD run on their decode "
         "alone (needs --disaggregate-min-tokens)."),
    Flag("disaggregate_max_itl_ms", float | None, "proxy.disaggregate_max_itl_ms",
         "Prompts that would run on their decode alone go PD while that decode's streams wait this many ms or more "
         "per token (set it a little under the TPOT target; needs --disaggregate-min-tokens).", metavar="<ms>"),
    Flag("prefill", int | None, "instances[prefill].count", "Number of prefill instances."),
    Flag("decode", int | None, "instances[decode].count", "Number of decode instances."),
    Flag("colocated", bool, "colocated", "One instance doing both phases (no KV transfer)."),
    Flag("tp", int | None, "parallel.tp", "Tensor-parallel size of every instance."),
    Flag("tensor_parallel_size", int | None, "parallel.tp", "Same as --tp (vLLM's spelling)."),
    Flag("tp_short", int | None, "parallel.tp", "Same as --tp (vLLM's spelling).", spelling="-tp"),
    Flag("enable_expert_parallel", bool, "parallel.enable_expert_parallel",
         "MoE models: whole experts per TP rank instead of every expert split over the ranks."),
    Flag("prefill_tp", int | None, "parallel.prefill_tp", "TP size of prefill instances."),
    Flag("decode_tp", int | None, "parallel.decode_tp", "TP size of decode instances."),
    Flag("prefill_expert_parallel", bool, "instances[prefill].enable_expert_parallel",
         "MoE: expert parallel for prefill instances only.", sets=True),
    Flag("no_prefill_expert_parallel", bool, "instances[prefill].enable_expert_parallel",
         "MoE: experts split over the TP ranks in prefill instances (overrides --enable-expert-parallel).",
         sets=False),
    Flag("decode_expert_parallel", bool, "instances[decode].enable_expert_parallel",
         "MoE: expert parallel for decode instances only.", sets=True),
    Flag("no_decode_expert_parallel", bool, "instances[decode].enable_expert_parallel",
         "MoE: experts split over the TP ranks in decode instances (overrides --enable-expert-parallel).",
         sets=False),
    Flag("kv_connector", str | None, "kv_transfer.connector", "nixl | mooncake | storage."),
    Flag("kv_transfer_config", str | None, KV_TRANSFER_CONFIG,
         "vLLM's KV transfer JSON: kv_connector NixlConnector | MooncakeConnector, kv_role kv_both, engine_id, "
         "kv_load_failure_policy, kv_connector_extra_config.mooncake_protocol."),
    Flag("transfer_mode", str | None, "kv_transfer.transfer_mode", "auto | pull | push."),
    Flag("block_size", int | None, "cache.block_size", "Tokens per KV block."),
    Flag("num_gpu_blocks", int | None, "cache.num_gpu_blocks", "Override the profiled KV block count."),
    Flag("enable_prefix_caching", bool, "cache.enable_prefix_caching",
         "Reuse KV blocks of identical prompt prefixes (default on).", sets=True),
    Flag("no_enable_prefix_caching", bool, "cache.enable_prefix_caching", "Turn prefix caching off.", sets=False),
    Flag("max_model_len", int | None, "model.max_model_len", "Longest prompt + output."),
    Flag("max_num_seqs", int | None, "scheduler.max_num_seqs", "Most sequences per batch."),
    Flag("max_num_batched_tokens", int | None, "scheduler.max_num_batched_tokens",
         "Most tokens in one step (chunked prefill); default 8192 colocated and prefill, 2048 decode."),
    Flag("prompt_tokens_while_decoding", int | None, "scheduler.prompt_tokens_while_decoding",
         "Most prompt tokens in a step that also runs decodes (default 1024; 0: no cap)."),
    Flag("async_scheduling", bool, "scheduler.async_scheduling",
         "Prepare the next step while the device runs this one (the default with CUDA; this flag: on CPU too).",
         sets=True),
    Flag("no_async_scheduling", bool, "scheduler.async_scheduling",
         "One step at a time: the host waits for each step's tokens (for debugging).", sets=False),
    Flag("dtype", str | None, "model.dtype", "auto | float32 | bfloat16 | float16."),
    Flag("quantization", str | None, "model.quantization", "fp8: quantize the weights to FP8 at load (per channel)."),
    Flag("kv_cache_dtype", str | None, "cache.kv_cache_dtype", "auto | fp8 (e4m3 KV cache, half of bf16's bytes)."),
    Flag("gpu_memory_utilization", float | None, "cache.gpu_memory_utilization",
         "Fraction of GPU memory an instance may use."),
    Flag("enable_cumem_allocator", bool, "model.enable_cumem_allocator", "Weights and KV cache in CuMem pools."),
    Flag("enable_sleep_mode", bool, "model.enable_sleep_mode", "Allow /sleep and /wake_up (turns cumem on)."),
    Flag("enforce_eager", bool, "model.enforce_eager", "No CUDA graphs: every step runs eagerly."),
    Flag("kv_offload_gb", float | None, "cache.kv_offload_gb", "CPU tier for KV blocks evicted from the GPU, GiB."),
    Flag("cpu_offload_gb", str | None, "cache.kv_offload_gb", "Refused: vLLM's offloads weights; see --kv-offload-gb.",
         refused="vLLM's --cpu-offload-gb offloads weights, which pdlaunch does not do; pdlaunch's CPU tier for "
         "KV blocks is --kv-offload-gb GiB"),
    Flag("log_dir", str | None, "log_dir", "Directory for per-instance logs."),
    Flag("node_rank", int | None, "parallel.node_rank", "Which node of `parallel.nodes` this is."),
    Flag("backend", str | None, "launcher.backend", "local | slurm | ray: who starts the processes (slurm: "
         "inside an allocation, one srun step per node; ray: actors on a Ray cluster)."),
    Flag("ray_address", str | None, "launcher.ray_address", "--backend ray: the cluster's GCS HOST:PORT, or auto."),
    Flag("seed", int | None, "model.seed", "Default sampling seed."),
    Flag("api_key", str | None, "security.api_key",
         "Clients must send `Authorization: Bearer KEY` (env PDLAUNCH_API_KEY).", envvar="PDLAUNCH_API_KEY"),
    Flag("served_model_name", str | None, "model.served_model_name",
         "Model name the API answers to (default: the --model value)."),
    Flag("kv_load_failure_policy", str | None, "kv_transfer.load_failure_policy",
         "recompute | fail: when a decode cannot load KV."),
    Flag("chat_template", str | None, "model.chat_template", "Jinja2 chat template FILE overriding the checkpoint's."),
    # vLLM habits that pdlaunch answers with what it does instead (hidden from --help; refused by name).
    Flag("pipeline_parallel_size", str | None, "parallel.tp", "Refused: no pipeline parallelism.",
         refused_why="is not supported: pdlaunch has no pipeline parallelism",
         refused="split a model over GPUs with --tp N (tensor parallel, within a node or across nodes with "
         "parallel.nodes); scale throughput with more --prefill/--decode instances"),
    Flag("pp_short", str | None, "parallel.tp", "Refused: no pipeline parallelism.", spelling="-pp",
         refused_why="is not supported: pdlaunch has no pipeline parallelism",
         refused="split a model over GPUs with --tp N (tensor parallel)"),
    Flag("enable_auto_tool_choice", bool, "model.path", "Refused: tool calling is always on.",
         refused_why="is not needed: pdlaunch always parses tool calls (tool_choice auto, none, required, named)",
         refused="drop the flag"),
    Flag("tool_call_parser", str | None, "model.path", "Refused: the parser is detected.",
         refused_why="is not needed: pdlaunch detects Hermes `<tool_call>` blocks and Llama 3 JSON calls itself",
         refused="drop the flag; a checkpoint's chat template decides how tools are offered"),
    Flag("trust_remote_code", bool, "model.path", "Refused: no checkpoint code is run.",
         refused_why="is not supported: pdlaunch runs its own Llama/Qwen/Mistral implementations, never Python "
         "code shipped with a checkpoint", refused="drop the flag; an architecture pdlaunch lacks is refused by name"),
    Flag("vllm_config", str | None, "model.path", "Refused: see the positional CONFIG.yaml.", spelling="--config",
         refused_why="is vLLM's file of serve flags, which pdlaunch does not read",
         refused="pass pdlaunch's deployment YAML as the positional CONFIG.yaml (`pdlaunch config example` "
         "prints one; every serve flag has a key there)"),
)
# `--help` groups the flags into these panels, in this order; a flag missing here lands in "Other".
HELP_PANELS: dict[str, tuple[str, ...]] = {
    "Model": ("model", "served_model_name", "dtype", "quantization", "max_model_len", "seed", "chat_template",
              "enforce_eager"),
    "Devices and parallelism": ("device", "prefill", "decode", "colocated", "tp", "tensor_parallel_size", "tp_short",
                                "prefill_tp", "decode_tp", "node_rank", "backend", "ray_address"),
    "Mixture of experts": ("enable_expert_parallel", "prefill_expert_parallel", "no_prefill_expert_parallel",
                           "decode_expert_parallel", "no_decode_expert_parallel"),
    "KV transfer": ("kv_connector", "transfer_mode", "kv_transfer_config", "kv_load_failure_policy",
                    "disaggregate_min_tokens", "disaggregate_max_queue_tokens", "disaggregate_max_itl_ms"),
    "KV cache": ("block_size", "kv_cache_dtype", "num_gpu_blocks", "enable_prefix_caching", "no_enable_prefix_caching",
                 "kv_offload_gb"),
    "Memory and scheduling": ("gpu_memory_utilization", "enable_cumem_allocator", "enable_sleep_mode", "max_num_seqs",
                              "max_num_batched_tokens", "prompt_tokens_while_decoding", "async_scheduling",
                              "no_async_scheduling"),
    "Server": ("host", "port", "routing_policy", "proxy_workers", "drain_timeout_seconds", "log_dir"),
    "Security": ("api_key",),
}
_PANEL_OF = {name: panel for panel, names in HELP_PANELS.items() for name in names}
_PANEL_ORDER = {panel: i for i, panel in enumerate(HELP_PANELS)}


def _config_default(path: str) -> str | None:
    """The value a flag's config path has when neither the flag nor the YAML sets it, for `--help`."""
    from pdlaunch.config.deployment_config import DeploymentConfig

    defaults = DeploymentConfig()
    value: object = defaults
    role = re.match(r"^instances\[(\w+)\]\.(\w+)$", path)
    if role is not None:
        group = next((g for g in defaults.instances if g.role == role[1]), None)
        value = getattr(group, role[2], None)
    else:
        for part in path.split("."):
            value = getattr(value, part, None)
    if value is None or value == "" or isinstance(value, bool):  # an on/off flag's help says its default
        return None
    return str(value).lower() if isinstance(value, bool) else str(value)


FLAG_PATHS: dict[str, str] = {flag.name: flag.path for flag in SERVE_FLAGS if flag.refused is None}
ENV_VARS = frozenset(flag.envvar for flag in SERVE_FLAGS if flag.envvar)  # PDLAUNCH_API_KEY
# The options whose value is a secret (--api-key): masked where a command line is recorded (the log_dir lock note)
SECRET_OPTIONS = frozenset(flag.option for flag in SERVE_FLAGS if flag.path in SECRET_PATHS)
_BY_NAME = {flag.name: flag for flag in SERVE_FLAGS}
_CONTEXT = "serve_context"  # the typer context the wrapper asks for: where each value came from

_SERVE_PARAMS: list[inspect.Parameter] = [
    inspect.Parameter("targets", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
        list[str] | None, typer.Argument(
            metavar="[MODEL] [CONFIG.yaml]", show_default=False,
            help="MODEL: a checkpoint directory, FILE.gguf, `demo` or `tiny` (as --model). "
                 "CONFIG.yaml: the deployment file; flags override it. Either, both or none.")]),
] + [
    inspect.Parameter(
        flag.name, inspect.Parameter.KEYWORD_ONLY, default=False if flag.type is bool else None,
        annotation=Annotated[flag.type, typer.Option(
            flag.declaration, help=flag.help, envvar=flag.envvar, hidden=flag.refused is not None,
            metavar=flag.metavar,
            show_default=(flag.refused is None and flag.envvar is None and _config_default(flag.path)) or False,
            rich_help_panel=_PANEL_OF.get(flag.name, "Other"))])
    for flag in sorted(SERVE_FLAGS, key=lambda f: _PANEL_ORDER.get(_PANEL_OF.get(f.name, "Other"), len(HELP_PANELS)))
]


def _given(flag: Flag, value: object) -> bool:
    return value is not None and not (flag.type is bool and value is False)


def collect_overrides(given: Mapping[str, object], targets: list[str], from_env: frozenset[str] = frozenset()
                      ) -> tuple[Path | None, Overrides]:
    """(config file or None, overrides) from the flags' values by parameter name and the positionals.
    A value of a parameter named in `from_env` came from the flag's environment variable, and is named by it."""
    overrides = Overrides()
    for name, value in given.items():
        flag = _BY_NAME[name]
        if not _given(flag, value):
            continue
        if flag.refused is not None:
            overrides.problems.append(problem(flag.option, flag.refused_why, flag.refused))
        elif flag.path == KV_TRANSFER_CONFIG:
            values, problems = kv_transfer_overrides(str(value))
            overrides.problems += problems
            for path, item in values.items():
                overrides.set(path, item, flag.option)
        else:
            spelling = flag.envvar if name in from_env and flag.envvar else flag.option
            overrides.set(flag.path, value if flag.sets is None else flag.sets, spelling)
    return split_positionals(targets, overrides), overrides


def empty_variable_problems(given: Mapping[str, object], env: Mapping[str, str]) -> list[Problem]:
    """A flag's environment variable set to "" (`PDLAUNCH_API_KEY="$KEY"` with KEY unset) is read as no value at
    all: serving with no API key is not what whoever set it meant."""
    return [problem(flag.envvar, "is set but empty, so it would be ignored", f"set it to the value of {flag.option}, "
                    f"or unset it (`unset {flag.envvar}`)")
            for name, value in given.items() if (flag := _BY_NAME[name]).envvar is not None and value is None
            and env.get(flag.envvar) == ""]


def with_serve_options(fn: Callable[..., R]) -> Callable[..., R]:
    """Add the shared serve flags to a typer command. The command receives `config: Path | None`
    and `overrides: Overrides` (only the flags the user gave) besides its own parameters."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name not in ("config", "overrides")]

    @functools.wraps(fn)
    def wrapper(**kwargs: object) -> R:
        targets = kwargs.pop("targets", None)
        ctx = cast(typer.Context, kwargs.pop(_CONTEXT))
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in _BY_NAME}
        from_env = frozenset(name for name in given if _from_environment(ctx, name))
        config, overrides = collect_overrides(given, [str(t) for t in targets] if isinstance(targets, list) else [],
                                              from_env)
        overrides.problems += empty_variable_problems(given, os.environ)
        return fn(config=config, overrides=overrides, **kwargs)

    params = _SERVE_PARAMS[:1] + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + _SERVE_PARAMS[1:]
    params.append(inspect.Parameter(_CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    # typer also reads get_type_hints(wrapper): evaluated annotations, not fn's strings (they would be
    # evaluated in this module's namespace)
    wrapper.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty}
    del wrapper.__wrapped__
    return wrapper


def _from_environment(ctx: typer.Context, name: str) -> bool:
    """Whether parameter `name` took its value from its environment variable (click's ParameterSource)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "ENVIRONMENT"
