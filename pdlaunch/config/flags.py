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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from pdlaunch.config.cli_overrides import Overrides, split_positionals
from pdlaunch.config.problems import problem
from pdlaunch.config.vllm_kv_transfer import kv_transfer_overrides


@dataclass(frozen=True)
class Flag:
    """One serve flag: its parameter name (`--prefill-tp` is `prefill_tp`), its type, the dotted
    config path it overrides, its help text and, for secrets, the environment variable it reads.
    `spelling` replaces the option derived from the name (`-tp`, an on/off pair); `refused` is the
    hint given when a spelling that means something else here is used."""

    name: str
    type: Any
    path: str
    help: str
    envvar: str | None = None
    spelling: str | None = None
    refused: str | None = None

    @property
    def declaration(self) -> str:
        return self.spelling or "--" + self.name.replace("_", "-")

    @property
    def option(self) -> str:
        """The spelling a problem names (the `on` half of an on/off pair)."""
        return self.declaration.split("/")[0]


KV_TRANSFER_CONFIG = "vllm.kv_transfer_config"  # not a config path: read into kv_transfer.* by vllm_kv_transfer
# Flags typed as str so that a bad value reaches our validation (field named, fix hinted)
# instead of click's own message.
SERVE_FLAGS: tuple[Flag, ...] = (
    Flag("model", str | None, "model.path",
         "HF checkpoint directory, FILE.gguf, `demo` (SmolLM2-135M-Instruct) or `tiny` (or the positional MODEL)."),
    Flag("device", str | None, "device", "auto | cpu | cuda."),
    Flag("host", str | None, "proxy.host", "Proxy bind address."),
    Flag("port", int | None, "proxy.port", "Proxy port."),
    Flag("disaggregate_min_tokens", int | None, "proxy.disaggregate_min_tokens",
         "Prompts of fewer tokens run on a decode instance alone (no prefill leg, no KV transfer)."),
    Flag("prefill", int | None, "instances[prefill].count", "Number of prefill instances."),
    Flag("decode", int | None, "instances[decode].count", "Number of decode instances."),
    Flag("colocated", bool, "colocated", "One instance doing both phases (no KV transfer)."),
    Flag("tp", int | None, "parallel.tp", "Tensor-parallel size of every instance."),
    Flag("tensor_parallel_size", int | None, "parallel.tp", "Same as --tp (vLLM's spelling)."),
    Flag("tp_short", int | None, "parallel.tp", "Same as --tp (vLLM's spelling).", spelling="-tp"),
    Flag("prefill_tp", int | None, "parallel.prefill_tp", "TP size of prefill instances."),
    Flag("decode_tp", int | None, "parallel.decode_tp", "TP size of decode instances."),
    Flag("kv_connector", str | None, "kv_transfer.connector", "nixl | mooncake | storage."),
    Flag("kv_transfer_config", str | None, KV_TRANSFER_CONFIG,
         "vLLM's KV transfer JSON: kv_connector NixlConnector | MooncakeConnector, kv_role kv_both, engine_id, "
         "kv_load_failure_policy, kv_connector_extra_config.mooncake_protocol."),
    Flag("transfer_mode", str | None, "kv_transfer.transfer_mode", "auto | pull | push."),
    Flag("block_size", int | None, "cache.block_size", "Tokens per KV block."),
    Flag("num_gpu_blocks", int | None, "cache.num_gpu_blocks", "Override the profiled KV block count."),
    Flag("enable_prefix_caching", bool | None, "cache.enable_prefix_caching",
         "Reuse KV blocks of identical prompt prefixes (default on).",
         spelling="--enable-prefix-caching/--no-enable-prefix-caching"),
    Flag("max_model_len", int | None, "model.max_model_len", "Longest prompt + output."),
    Flag("max_num_seqs", int | None, "scheduler.max_num_seqs", "Most sequences per batch."),
    Flag("max_num_batched_tokens", int | None, "scheduler.max_num_batched_tokens",
         "Most tokens in one step (chunked prefill)."),
    Flag("dtype", str | None, "model.dtype", "auto | float32 | bfloat16 | float16."),
    Flag("gpu_memory_utilization", float | None, "cache.gpu_memory_utilization",
         "Fraction of GPU memory an instance may use."),
    Flag("enable_cumem_allocator", bool, "model.enable_cumem_allocator", "Weights and KV cache in CuMem pools."),
    Flag("enable_sleep_mode", bool, "model.enable_sleep_mode", "Allow /sleep and /wake_up (turns cumem on)."),
    Flag("enforce_eager", bool, "model.enforce_eager", "Decode without CUDA graphs."),
    Flag("kv_offload_gb", float | None, "cache.kv_offload_gb", "CPU tier for KV blocks evicted from the GPU, GiB."),
    Flag("cpu_offload_gb", str | None, "cache.kv_offload_gb", "Refused: vLLM's offloads weights; see --kv-offload-gb.",
         refused="vLLM's --cpu-offload-gb offloads weights, which pdlaunch does not do; pdlaunch's CPU tier for "
         "KV blocks is --kv-offload-gb GiB"),
    Flag("log_dir", str | None, "log_dir", "Directory for per-instance logs."),
    Flag("node_rank", int | None, "parallel.node_rank", "Which node of `parallel.nodes` this is."),
    Flag("seed", int | None, "model.seed", "Default sampling seed."),
    Flag("api_key", str | None, "security.api_key",
         "Clients must send `Authorization: Bearer KEY` (env PDLAUNCH_API_KEY).", envvar="PDLAUNCH_API_KEY"),
    Flag("served_model_name", str | None, "model.served_model_name",
         "Model name the API answers to (default: the --model value)."),
    Flag("kv_load_failure_policy", str | None, "kv_transfer.load_failure_policy",
         "recompute | fail: when a decode cannot load KV."),
    Flag("chat_template", str | None, "model.chat_template", "Jinja2 chat template FILE overriding the checkpoint's."),
)
FLAG_PATHS: dict[str, str] = {flag.name: flag.path for flag in SERVE_FLAGS if flag.refused is None}
_BY_NAME = {flag.name: flag for flag in SERVE_FLAGS}

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
            flag.declaration, help=flag.help, show_default=False, envvar=flag.envvar, hidden=flag.refused is not None)])
    for flag in SERVE_FLAGS
]


def _given(flag: Flag, value: Any) -> bool:
    return value is not None and not (flag.type is bool and value is False)


def collect_overrides(given: dict[str, Any], targets: list[str]) -> tuple[Path | None, Overrides]:
    """(config file or None, overrides) from the flags' values by parameter name and the positionals."""
    overrides = Overrides()
    for name, value in given.items():
        flag = _BY_NAME[name]
        if not _given(flag, value):
            continue
        if flag.refused is not None:
            overrides.problems.append(problem(flag.option, "means something else in pdlaunch", flag.refused))
        elif flag.path == KV_TRANSFER_CONFIG:
            values, problems = kv_transfer_overrides(value)
            overrides.problems += problems
            for path, item in values.items():
                overrides.set(path, item, flag.option)
        else:
            overrides.set(flag.path, value, flag.option)
    return split_positionals(targets, overrides), overrides


def with_serve_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared serve flags to a typer command. The command receives `config: Path | None`
    and `overrides: Overrides` (only the flags the user gave) besides its own parameters."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name not in ("config", "overrides")]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        targets = kwargs.pop("targets", None) or []
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in _BY_NAME}
        config, overrides = collect_overrides(given, targets)
        return fn(config=config, overrides=overrides, **kwargs)

    params = _SERVE_PARAMS[:1] + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + _SERVE_PARAMS[1:]
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    del wrapper.__wrapped__
    return wrapper
