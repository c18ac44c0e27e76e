"""Serve flags shared by `serve`, `check-config` and `smoke`, and where each lands in the config.

Every flag has a YAML key: SERVE_FLAGS declares each flag once (name, type, config path, help);
FLAG_PATHS maps the flag's parameter name to its dotted config path.
`--prefill N` / `--decode N` set the count of the instance group with that role.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer


@dataclass(frozen=True)
class Flag:
    """One serve flag: its parameter name (`--prefill-tp` is `prefill_tp`), its type, the dotted
    config path it overrides, its help text and, for secrets, the environment variable it reads."""

    name: str
    type: Any
    path: str
    help: str
    envvar: str | None = None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


# Flags typed as str so that a bad value reaches our validation (field named, fix hinted)
# instead of click's own message.
SERVE_FLAGS: tuple[Flag, ...] = (
    Flag("model", str | None, "model.path",
         "HF checkpoint directory, FILE.gguf, `demo` (SmolLM2-135M-Instruct) or `tiny`."),
    Flag("device", str | None, "device", "auto | cpu | cuda."),
    Flag("host", str | None, "proxy.host", "Proxy bind address."),
    Flag("port", int | None, "proxy.port", "Proxy port."),
    Flag("prefill", int | None, "instances[prefill].count", "Number of prefill instances."),
    Flag("decode", int | None, "instances[decode].count", "Number of decode instances."),
    Flag("colocated", bool, "colocated", "One instance doing both phases (no KV transfer)."),
    Flag("tp", int | None, "parallel.tp", "Tensor-parallel size of every instance."),
    Flag("prefill_tp", int | None, "parallel.prefill_tp", "TP size of prefill instances."),
    Flag("decode_tp", int | None, "parallel.decode_tp", "TP size of decode instances."),
    Flag("kv_connector", str | None, "kv_transfer.connector", "nixl | mooncake | storage."),
    Flag("transfer_mode", str | None, "kv_transfer.transfer_mode", "auto | pull | push."),
    Flag("block_size", int | None, "cache.block_size", "Tokens per KV block."),
    Flag("num_gpu_blocks", int | None, "cache.num_gpu_blocks", "Override the profiled KV block count."),
    Flag("max_model_len", int | None, "model.max_model_len", "Longest prompt + output."),
    Flag("max_num_seqs", int | None, "scheduler.max_num_seqs", "Most sequences per batch."),
    Flag("dtype", str | None, "model.dtype", "auto | float32 | bfloat16 | float16."),
    Flag("gpu_memory_utilization", float | None, "cache.gpu_memory_utilization",
         "Fraction of GPU memory an instance may use."),
    Flag("enable_cumem_allocator", bool, "model.enable_cumem_allocator", "Weights and KV cache in CuMem pools."),
    Flag("enable_sleep_mode", bool, "model.enable_sleep_mode", "Allow /sleep and /wake_up (turns cumem on)."),
    Flag("enforce_eager", bool, "model.enforce_eager", "Decode without CUDA graphs."),
    Flag("cpu_offload_gb", float | None, "cache.cpu_offload_gb", "CPU tier for KV offload, GiB."),
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
FLAG_PATHS: dict[str, str] = {flag.name: flag.path for flag in SERVE_FLAGS}

_SERVE_PARAMS: list[inspect.Parameter] = [
    inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
        Path | None, typer.Argument(help="Deployment YAML file; flags override it.", show_default=False)]),
] + [
    inspect.Parameter(
        flag.name, inspect.Parameter.KEYWORD_ONLY, default=False if flag.type is bool else None,
        annotation=Annotated[flag.type, typer.Option(flag.option, help=flag.help, show_default=False,
                                                     envvar=flag.envvar)])
    for flag in SERVE_FLAGS
]


def with_serve_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared serve flags to a typer command. The command receives `config: Path | None`
    and `overrides: dict[str, Any]` (only the flags the user gave) besides its own parameters."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name not in ("config", "overrides")]
    names = set(FLAG_PATHS)

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        config = kwargs.pop("config", None)
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        overrides = {FLAG_PATHS[k]: v for k, v in given.items() if v is not None and v is not False}
        return fn(config=config, overrides=overrides, **kwargs)

    params = _SERVE_PARAMS[:1] + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + _SERVE_PARAMS[1:]
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    del wrapper.__wrapped__
    return wrapper
