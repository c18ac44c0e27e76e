"""`pdlaunch check-config`: load + validate a deployment, print a summary and every problem, exit 0/1."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from pdlaunch.config.backend import backend_target, with_backend_nodes
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.flag_names import flag_fields, name_flags
from pdlaunch.config.flag_terms import in_flag_terms
from pdlaunch.config.instance_names import instance_name, role_numbers
from pdlaunch.config.loader import (
    flag_over_file_warnings,
    load_deployment,
    role_flag_warnings,
    with_rule_problems,
)
from pdlaunch.config.model_info import ModelInfo
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.proxy_workers import workers_text
from pdlaunch.config.rules.host_memory import host_memory_findings, host_memory_line
from pdlaunch.config.rules.memory import GIB, deployment_quant_config, device_budget_bytes, estimate
from pdlaunch.config.rules.no_effect import no_effect_warnings
from pdlaunch.config.rules.node_ports import node_port_warnings
from pdlaunch.config.rules.rendezvous import rendezvous_timeout_warnings
from pdlaunch.config.rules.resources import busy_port_warnings, port_plan
from pdlaunch.config.rules.roles import size_problems
from pdlaunch.config.rules.security import world_readable_secret_warnings
from pdlaunch.config.serving_env import serving_env_problems, serving_env_warnings
from pdlaunch.config.target_host import TargetHost, gpu_memory_bytes, target_problems
from pdlaunch.config.topology_config import group_expert_parallel, group_kv_cache_dtype
from pdlaunch.config.validate import checked_on_nodes, cumem_reason, model_info_for, validate_deployment
from pdlaunch.errors import ConfigError, PdlaunchError


def check(config_path: Path | None, overrides: Mapping[str, object], target_gpus: int | None,
          target_gpu_memory: float | None) -> tuple[list[Problem], DeploymentConfig | None, TargetHost | None]:
    """Every problem, the resolved config (None when the file or values could not be parsed), the target."""
    target, problems = target_problems(target_gpus, target_gpu_memory)
    try:
        cfg = load_deployment(config_path, overrides)
    except ConfigError as exc:
        if not problems:  # with a half-declared target host the rules would check the wrong host
            with_rule_problems(exc, target)
        return problems + [Problem(field, message) for field, message in exc.problems], None, target
    if problems:  # a half-declared target host: checking against this machine instead would mislead
        return problems, None, target
    try:
        cfg = with_backend_nodes(cfg)
        target = target or backend_target(cfg)  # ray: the cluster's GPUs, unless a target host is declared
    except PdlaunchError as exc:  # what the backend needs and this machine lacks
        found = [problem(exc.field or "launcher.backend", exc.message, exc.hint or "")]
        return name_flags(found, flag_fields(overrides, cfg.instances)), None, target
    found, resolved = validate_deployment(cfg, target)
    return name_flags(found, flag_fields(overrides, cfg.instances)), resolved, target


_WIDEST_TABLE = 1000  # columns: a bound for measuring the instances table's natural width


def _host_line(cfg: DeploymentConfig, target: TargetHost | None, flags: Mapping[str, str]) -> str:
    if cfg.launcher.backend == "ray":  # the instances run on the cluster's nodes, never on this machine
        from pdlaunch.config.ray_check import ray_host_line

        # `--ray-address auto` typed: named as the flag, not the key launcher.ray_address the user never wrote
        return in_flag_terms(ray_host_line(cfg, target), flags)
    if target is not None:
        return f"target host: {target.gpus} GPU(s) x {target.gpu_memory_gib:g} GiB ({target.source})"
    if checked_on_nodes(cfg, target):
        return f"the allocation's nodes ({cfg.device}; each node's step checks its own GPUs)"
    return f"this machine ({cfg.device})"


def _ports_of_group(cfg: DeploymentConfig, index: int) -> str:
    group = cfg.instances[index]
    if group.base_port is None:
        return "free"
    return f"{group.base_port}" if group.count <= 1 else f"{group.base_port}-{group.base_port + group.count - 1}"


def _names_of_group(role: str, numbers: range) -> str:
    """The group's instance names (numbered per role across groups): `decode-1`, or `decode-1..3` for several."""
    if not numbers:
        return "none"
    return instance_name(role, numbers[0]) + (f"..{numbers[-1]}" if numbers[-1] != numbers[0] else "")


class GroupSettings(NamedTuple):
    """What an instance group runs with that several flags decide: expert parallelism (None: not a MoE model, or
    its config.json did not parse) and the KV cache dtype ("auto" resolved to the model dtype)."""

    expert_parallel: bool | None
    kv_cache_dtype: str


def group_settings(cfg: DeploymentConfig, info: ModelInfo | None) -> list[GroupSettings]:
    """Per instance group of the resolved config, in order."""
    moe = info is not None and info.moe is not None
    return [GroupSettings(group_expert_parallel(cfg.parallel, group) if moe else None,
                          "fp8" if group_kv_cache_dtype(cfg.cache, group) == "fp8" else cfg.model.dtype)
            for group in cfg.instances]


def weights_quantization(cfg: DeploymentConfig) -> str | None:
    """The weights' FP8 format (the checkpoint's, or --quantization fp8's), e.g. "fp8 block 128x128 (checkpoint)";
    None when unquantized, or when the quantization_config is malformed (a problem reported on its own)."""
    quant = deployment_quant_config(cfg)
    return None if quant is None else quant.description


def _instances(console: Console, cfg: DeploymentConfig, info: ModelInfo | None, target: TargetHost | None,
               flags: Mapping[str, str]) -> None:
    """The model line and the instances table (`flags`: config path -> the flag that set it)."""
    quantization = weights_quantization(cfg)
    # CPU has no FP8 GEMM: the weights are dequantized into the model dtype as they load
    weights = "" if quantization is None else f"  weights {quantization}" + (
        f", dequantized to {cfg.model.dtype} on cpu" if cfg.device == "cpu" else "")
    settings = group_settings(cfg, info)
    kv_dtypes = {s.kv_cache_dtype for s in settings}
    # one fp8 KV cache for every group: said on the model line; groups that differ (colocated): a column
    kv_column = len(kv_dtypes) > 1
    kv_line = "  kv cache fp8" if kv_dtypes == {"fp8"} else ""
    console.print(Text(f"model {cfg.model.path}  dtype {cfg.model.dtype}{weights}  max_model_len "
                       f"{cfg.model.max_model_len}  block_size {cfg.cache.block_size}{kv_line}  "
                       f"on {_host_line(cfg, target, flags)}"))
    ep = any(s.expert_parallel is not None for s in settings)  # a MoE model
    table = Table(title="instances", title_justify="left")
    extra_columns = (["ep"] if ep else []) + (["kv cache"] if kv_column else [])
    for column in ("group", "role", "count", "names", "tp", *extra_columns, "devices", "node", "http ports"):
        table.add_column(column)
    for i, (group, numbers, setting) in enumerate(zip(cfg.instances, role_numbers(cfg.instances), settings)):
        devices = "cpu" if cfg.device == "cpu" else (",".join(map(str, group.devices)) if group.devices else "auto")
        extra = (["on" if setting.expert_parallel else "off"] if ep else []) + (
            [setting.kv_cache_dtype] if kv_column else [])
        table.add_row(str(i), group.role, str(group.count), _names_of_group(group.role, numbers), str(group.tp),
                      *extra, devices, str(group.node), _ports_of_group(cfg, i))
    # wider than the terminal: printed whole (the terminal wraps it) rather than with names cut to "prefil…"
    whole = Measurement.get(console, console.options.update_width(_WIDEST_TABLE), table).maximum
    if whole > console.width:
        table.width = whole
    console.print(table)


def _summary(console: Console, cfg: DeploymentConfig, target: TargetHost | None, flags: Mapping[str, str]) -> None:
    info, _ = model_info_for(cfg)
    _instances(console, cfg, info, target, flags)
    if size_problems(cfg):  # reported below; planning its ports or memory would walk every rank
        return
    transfer = ("none (colocated)" if cfg.colocated
                else f"{cfg.kv_transfer.connector}, mode {cfg.kv_transfer.transfer_mode}")
    side = cfg.kv_transfer.side_channel_port
    channel = ("none (storage)" if cfg.kv_transfer.connector == "storage" else
               f"{cfg.kv_transfer.side_channel_host}:{side if side is not None else 'free'}")
    fixed = ", ".join((f"node {r.node} " if cfg.parallel.nodes else "") + r.label() for r in port_plan(cfg)) or "none"
    console.print(Text(f"proxy {cfg.proxy.host}:{cfg.proxy.port}  workers {workers_text(cfg.proxy.workers)}  "
                       f"side channel {channel}  "
                       f"fixed: {fixed}"))
    console.print(Text(f"kv transfer: {transfer}   cumem allocator: {cumem_reason(cfg)}   "
                       f"sleep mode: {'on' if cfg.model.enable_sleep_mode else 'off'}"))
    if info is None or cfg.model.max_model_len is None or cfg.device == "auto":  # auto: dtype too is each node's
        return
    kv = "KV of cache.num_gpu_blocks" if cfg.cache.num_gpu_blocks else "KV of one max_model_len sequence"
    memory = Table(title=f"memory estimate per TP rank (weights + {kv})", title_justify="left")
    for column in ("group", "role", "weights GiB", "kv GiB", "total GiB", "budget GiB"):
        memory.add_column(column)
    on_nodes = checked_on_nodes(cfg, target)
    gpu_bytes = None if on_nodes else gpu_memory_bytes(cfg.device, target)
    # A cuda config on a machine without a GPU (the problems below say so): its budget is a GPU host's, not the
    # CPU KV cache's, which it does not use; --target-gpus/--target-gpu-memory give one to size it by.
    budget = (f"{device_budget_bytes(cfg, gpu_bytes) / GIB:.2f}" if gpu_bytes is not None
              else "each node's GPU" if on_nodes and cfg.device == "cuda"
              else "unknown: no GPU here" if cfg.device == "cuda"
              else f"{cfg.cache.num_gpu_blocks} blocks (cpu kv)" if cfg.cache.num_gpu_blocks is not None
              else f"{cfg.cache.cpu_kv_cache_gb:g} (cpu kv)")
    for est in estimate(cfg, info):
        memory.add_row(str(est.group), est.role, f"{est.weights_bytes / GIB:.3f}", f"{est.kv_bytes / GIB:.3f}",
                       f"{est.total_bytes / GIB:.3f}", budget)
    console.print(memory)
    here = host_memory_line(cfg, info) if target is None else None
    if here is not None:
        console.print(Text(here))


def _port_warnings(cfg: DeploymentConfig) -> list[Problem]:
    """Fixed ports something holds now: this node's by a bind test (local backend), the other nodes' whose
    addresses are known by a TCP connect (rules/node_ports.py). Not for a target host: its ports are not here."""
    if cfg.launcher.backend == "ray":  # Ray places every rank: no port of this machine or a known node
        return []
    here = busy_port_warnings(cfg) if cfg.launcher.backend == "local" else []
    return here + node_port_warnings(cfg)


class CheckReport(NamedTuple):
    """What check-config found: print_report prints it."""

    problems: list[Problem]
    warnings: list[Problem]
    resolved: DeploymentConfig | None
    target: TargetHost | None
    flags: Mapping[str, str]  # config path -> the flag that set it: the summary names what the user typed


def check_report(config_path: Path | None, overrides: Mapping[str, object], target_gpus: int | None,
                 target_gpu_memory: float | None) -> CheckReport:
    """Every problem and warning: the part of check-config that takes time (reading the checkpoint, asking a
    cluster, probing ports), which a stop signal may cut short; printing the verdict is print_report's."""
    problems, resolved, target = check(config_path, overrides, target_gpus, target_gpu_memory)
    problems = problems + serving_env_problems(resolved)  # also when the config did not load
    warnings = (world_readable_secret_warnings(config_path) + flag_over_file_warnings(config_path, overrides)
                + role_flag_warnings(config_path, overrides) + serving_env_warnings(os.environ))
    if resolved is not None:
        info = model_info_for(resolved)[0]
        warnings += name_flags(no_effect_warnings(resolved, info) + rendezvous_timeout_warnings(resolved),
                               flag_fields(overrides, resolved.instances))
    if resolved is not None and not problems and target is None:
        found = _port_warnings(resolved) + host_memory_findings(resolved, info)[1]
        warnings += name_flags(found, flag_fields(overrides, resolved.instances))
    if resolved is not None and not problems and resolved.launcher.backend == "ray":
        from pdlaunch.config.ray_fit import free_warnings  # the ray package: only under --backend ray

        warnings += free_warnings(resolved)  # the deployment fits the idle cluster: is that much free now?
    flags = flag_fields(overrides, resolved.instances) if resolved is not None else {}
    return CheckReport(problems, warnings, resolved, target, flags)


def _json_summary(cfg: DeploymentConfig) -> dict[str, object]:
    """The summary's derived settings for --json: what `config` holds only as flags and defaults."""
    settings = group_settings(cfg, model_info_for(cfg)[0])
    return {"weights_quantization": weights_quantization(cfg),
            "instances": [{"group": i, "role": group.role, "expert_parallel": setting.expert_parallel,
                           "kv_cache_dtype": setting.kv_cache_dtype}
                          for i, (group, setting) in enumerate(zip(cfg.instances, settings))]}


def print_report(report: CheckReport, json_output: bool) -> int:
    """Print the report (or one JSON object with --json); 0 when valid, 1 when any problem was found."""
    problems, warnings, resolved, target, flags = report
    if json_output:
        doc = {
            "valid": not problems,
            "problems": [p.as_dict() for p in problems],
            "warnings": [w.as_dict() for w in warnings],
            "config": resolved.model_dump(mode="json") if resolved is not None else None,
            "summary": _json_summary(resolved) if resolved is not None else None,
        }
        print(json.dumps(doc, indent=2))
        return 0 if not problems else 1
    console = Console(highlight=False, soft_wrap=True)
    if resolved is not None:
        _summary(console, resolved, target, flags)
    for field, message in warnings:
        line = Text("warning: ", style="bold yellow")
        line.append(f"{field}: {message}")
        console.print(line)
    for field, message in problems:
        line = Text("error: ", style="bold red")
        line.append(f"{field}: {message}")
        console.print(line)
    if problems:
        console.print(Text(f"invalid: {len(problems)} problem(s)", style="bold red"))
        return 1
    console.print(Text("valid", style="bold green"))
    return 0
