"""Serve flags shared by `serve`, `check-config` and `smoke`, and where each lands in the config.

Every flag has a YAML key: FLAG_PATHS maps the flag's parameter name to its dotted config path.
`--prefill N` / `--decode N` set the count of the instance group with that role.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

FLAG_PATHS: dict[str, str] = {
    "model": "model.path",
    "device": "device",
    "host": "proxy.host",
    "port": "proxy.port",
    "prefill": "instances[prefill].count",
    "decode": "instances[decode].count",
    "colocated": "colocated",
    "tp": "parallel.tp",
    "prefill_tp": "parallel.prefill_tp",
    "decode_tp": "parallel.decode_tp",
    "kv_connector": "kv_transfer.connector",
    "transfer_mode": "kv_transfer.transfer_mode",
    "block_size": "cache.block_size",
    "num_gpu_blocks": "cache.num_gpu_blocks",
    "max_model_len": "model.max_model_len",
    "max_num_seqs": "scheduler.max_num_seqs",
    "dtype": "model.dtype",
    "gpu_memory_utilization": "cache.gpu_memory_utilization",
    "enable_cumem_allocator": "model.enable_cumem_allocator",
    "enable_sleep_mode": "model.enable_sleep_mode",
    "enforce_eager": "model.enforce_eager",
    "cpu_offload_gb": "cache.cpu_offload_gb",
    "log_dir": "log_dir",
    "node_rank": "parallel.node_rank",
    "seed": "model.seed",
    "api_key": "security.api_key",
    "served_model_name": "model.served_model_name",
    "kv_load_failure_policy": "kv_transfer.load_failure_policy",
    "chat_template": "model.chat_template",
}

# Flags typed as str so that a bad value reaches our validation (field named, fix hinted)
# instead of click's own message.
_SERVE_PARAMS: list[inspect.Parameter] = [
    inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
        Optional[Path], typer.Argument(help="Deployment YAML file; flags override it.", show_default=False)]),
]
_OPTS: list[tuple[str, Any, str]] = [
    ("model", Optional[str], "HF checkpoint directory, FILE.gguf, `demo` (SmolLM2-135M-Instruct) or `tiny`."),
    ("device", Optional[str], "auto | cpu | cuda."),
    ("host", Optional[str], "Proxy bind address."),
    ("port", Optional[int], "Proxy port."),
    ("prefill", Optional[int], "Number of prefill instances."),
    ("decode", Optional[int], "Number of decode instances."),
    ("colocated", bool, "One instance doing both phases (no KV transfer)."),
    ("tp", Optional[int], "Tensor-parallel size of every instance."),
    ("prefill_tp", Optional[int], "TP size of prefill instances."),
    ("decode_tp", Optional[int], "TP size of decode instances."),
    ("kv_connector", Optional[str], "nixl | mooncake | storage."),
    ("transfer_mode", Optional[str], "auto | pull | push."),
    ("block_size", Optional[int], "Tokens per KV block."),
    ("num_gpu_blocks", Optional[int], "Override the profiled KV block count."),
    ("max_model_len", Optional[int], "Longest prompt + output."),
    ("max_num_seqs", Optional[int], "Most sequences per batch."),
    ("dtype", Optional[str], "auto | float32 | bfloat16 | float16."),
    ("gpu_memory_utilization", Optional[float], "Fraction of GPU memory an instance may use."),
    ("enable_cumem_allocator", bool, "Weights and KV cache in CuMem pools."),
    ("enable_sleep_mode", bool, "Allow /sleep and /wake_up (turns cumem on)."),
    ("enforce_eager", bool, "Decode without CUDA graphs."),
    ("cpu_offload_gb", Optional[float], "CPU tier for KV offload, GiB."),
    ("log_dir", Optional[str], "Directory for per-instance logs."),
    ("node_rank", Optional[int], "Which node of `parallel.nodes` this is."),
    ("seed", Optional[int], "Default sampling seed."),
    ("api_key", Optional[str], "Clients must send `Authorization: Bearer KEY` (env PDLAUNCH_API_KEY)."),
    ("served_model_name", Optional[str], "Model name the API answers to (default: the --model value)."),
    ("kv_load_failure_policy", Optional[str], "recompute | fail: when a decode cannot load KV."),
    ("chat_template", Optional[str], "Jinja2 chat template FILE overriding the checkpoint's."),
]
_ENVVARS = {"api_key": "PDLAUNCH_API_KEY"}
for _name, _type, _help in _OPTS:
    _flag = "--" + _name.replace("_", "-")
    _default = False if _type is bool else None
    _SERVE_PARAMS.append(inspect.Parameter(
        _name, inspect.Parameter.KEYWORD_ONLY, default=_default,
        annotation=Annotated[_type, typer.Option(_flag, help=_help, show_default=False,
                                                 envvar=_ENVVARS.get(_name))]))


def with_serve_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared serve flags to a typer command. The command receives `config: Path | None`
    and `overrides: dict[str, Any]` (only the flags the user gave) besides its own parameters."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name not in ("config", "overrides")]
    names = {name for name, _, _ in _OPTS}

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
