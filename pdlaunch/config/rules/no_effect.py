"""Warnings (not errors) for settings that do nothing with this model, so a user does not believe them on.

vLLM accepts `--enable-expert-parallel` with a dense model and says nothing; here check-config and serve say
that it places nothing (a dense model has no experts), naming the flag or field the user set. Likewise the
settings of KV transfer and of prefill/decode TP in a deployment without prefill or decode instances (all
colocated: no KV moves between instances), the KV budget settings that another one overrides, and prefix-aware
routing with prefix caching off (no instance caches a prefix to route by). Only values the user set are named
(pydantic's fields_set).
"""

from __future__ import annotations

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.model_info import ModelInfo
from pdlaunch.config.problems import Problem, problem


def no_effect_warnings(cfg: DeploymentConfig, info: ModelInfo | None) -> list[Problem]:
    """Every setting of the resolved `cfg` that does nothing here, as warnings."""
    return (expert_parallel_warnings(cfg, info) + colocated_warnings(cfg) + kv_budget_warnings(cfg)
            + prefix_routing_warnings(cfg) + overridden_warnings(cfg, info) + connector_warnings(cfg))


def expert_parallel_warnings(cfg: DeploymentConfig, info: ModelInfo | None) -> list[Problem]:
    """Expert parallelism asked for (deployment-wide or per group) on a model without experts."""
    if info is None or info.moe is not None:
        return []
    fields = ["parallel.enable_expert_parallel"] if cfg.parallel.enable_expert_parallel else []
    fields += [f"instances[{i}].enable_expert_parallel" for i, group in enumerate(cfg.instances)
               if group.enable_expert_parallel]
    return [problem(field, f"has no effect: {cfg.model.path!r} ({info.architecture}) is a dense model, with no "
                    "experts to place", "drop it, or serve a Mixture-of-Experts checkpoint") for field in fields]


def colocated_warnings(cfg: DeploymentConfig) -> list[Problem]:
    """KV transfer's connector, mode, load-failure policy and checksums, and prefill/decode TP, set for a deployment
    whose instances are all colocated."""
    if any(group.role in ("prefill", "decode") for group in cfg.instances):
        return []
    hint = "drop it, or serve prefill and decode instances"
    found = [problem(f"kv_transfer.{name}", "has no effect: every instance is colocated, so no KV moves between "
                     "instances", hint) for name in ("connector", "transfer_mode", "load_failure_policy", "verify_kv",
                                                     "storage_path", "mooncake_protocol", "mooncake_metadata_server")
             if name in cfg.kv_transfer.model_fields_set]
    found += [problem(f"parallel.{name}", "has no effect: every instance is colocated, with no prefill or decode "
                      "instance to take it (parallel.tp sizes colocated ones)", hint)
              for name in ("prefill_tp", "decode_tp") if name in cfg.parallel.model_fields_set]
    return found


def kv_budget_warnings(cfg: DeploymentConfig) -> list[Problem]:
    """The KV cache size comes from one setting: cache.num_gpu_blocks when set, else gpu_memory_utilization on
    CUDA and cpu_kv_cache_gb on the CPU (runner/kv_cache_tensors.py); the others set beside it do nothing."""
    cache, given = cfg.cache, cfg.cache.model_fields_set
    if cache.num_gpu_blocks is not None:
        return [problem(f"cache.{name}", "has no effect: cache.num_gpu_blocks fixes the KV cache's size",
                        "drop one of the two") for name in ("gpu_memory_utilization", "cpu_kv_cache_gb")
                if name in given]
    if cfg.device == "cpu" and "gpu_memory_utilization" in given:
        return [problem("cache.gpu_memory_utilization", "has no effect on the CPU: cache.cpu_kv_cache_gb sizes "
                        "the KV cache there", "drop it, or set cache.cpu_kv_cache_gb")]
    if cfg.device == "cuda" and "cpu_kv_cache_gb" in given:
        return [problem("cache.cpu_kv_cache_gb", "has no effect on CUDA: --gpu-memory-utilization sizes the KV "
                        "cache there", "drop it, or set --gpu-memory-utilization")]
    return []


def prefix_routing_warnings(cfg: DeploymentConfig) -> list[Problem]:
    """routing_policy prefix where the instances cache no prefix: they publish no cached blocks (kvcache/
    block_manager.py registers none without prefix caching), so every score ties and the proxy routes as
    least_loaded, after tokenizing every prompt for nothing (proxy/prefix.py)."""
    if cfg.proxy.routing_policy != "prefix" or cfg.cache.enable_prefix_caching:
        return []
    return [problem("proxy.routing_policy", "prefix has no effect: prefix caching is off, so no instance caches a "
                    "prefix to route by and every prompt goes to the least loaded instance",
                    "drop --no-enable-prefix-caching, or use --routing-policy least_loaded")]


def overridden_warnings(cfg: DeploymentConfig, info: ModelInfo | None) -> list[Problem]:
    """A deployment-wide setting that every instance takes from somewhere else instead: parallel.tp under each
    group's tp or its role's parallel.prefill_tp / decode_tp, a role's TP under each of its groups' tp, and
    parallel.enable_expert_parallel and cache.kv_cache_dtype under each group's own. Groups of count 0 run nothing.
    `cfg` is the resolved config: a group's tp is in its fields_set only where the user set it (validate.resolve)."""
    groups = [(i, g) for i, g in enumerate(cfg.instances) if g.count > 0]
    parallel = cfg.parallel
    found: list[Problem] = []

    def own(key: str, role: str | None = None) -> list[str] | None:
        """The group fields that set `key` for every group (of `role`); None when some group takes it from above."""
        chosen = [(i, g) for i, g in groups if role is None or g.role == role]
        if not chosen or any(key not in g.model_fields_set or getattr(g, key) is None for _, g in chosen):
            return None
        return [f"instances[{i}].{key}" for i, _ in chosen]

    def warn(field: str, what: str, sources: list[str]) -> None:
        found.append(problem(field, f"has no effect: every {what} from {', '.join(dict.fromkeys(sources))} instead",
                             "drop it, or drop those"))

    if "tp" in parallel.model_fields_set and groups:
        sources: list[str] = []
        for i, group in groups:
            role_tp = {"prefill": "prefill_tp", "decode": "decode_tp"}.get(group.role)
            if "tp" in group.model_fields_set:
                sources.append(f"instances[{i}].tp")
            elif role_tp is not None and getattr(parallel, role_tp) is not None:
                sources.append(f"parallel.{role_tp}")
            else:
                break
        else:
            warn("parallel.tp", "instance takes its TP size", sources)
    for role in ("prefill", "decode"):
        taken = own("tp", role) if f"{role}_tp" in parallel.model_fields_set else None
        if taken is not None:
            warn(f"parallel.{role}_tp", f"{role} instance takes its TP size", taken)
    moe = info is None or info.moe is not None  # a dense model's expert parallelism: expert_parallel_warnings
    taken = own("enable_expert_parallel") if "enable_expert_parallel" in parallel.model_fields_set else None
    if moe and taken is not None:
        warn("parallel.enable_expert_parallel", "instance takes its expert parallelism", taken)
    taken = own("kv_cache_dtype") if "kv_cache_dtype" in cfg.cache.model_fields_set else None
    if taken is not None:
        warn("cache.kv_cache_dtype", "instance takes its KV cache dtype", taken)
    return found


# The kv_transfer settings only some connectors read (colocated_warnings names them too: no connector runs there).
_CONNECTOR_FIELDS = {"transfer_mode": ("nixl", "mooncake"), "side_channel_port": ("nixl", "mooncake"),
                     "side_channel_host": ("nixl", "mooncake"),
                     "storage_path": ("storage",),
                     "mooncake_protocol": ("mooncake",), "mooncake_metadata_server": ("mooncake",)}


def connector_warnings(cfg: DeploymentConfig) -> list[Problem]:
    """A kv_transfer setting that the chosen connector does not read (storage moves KV through files, with no
    pull or push and no side channel; only mooncake has a protocol and a metadata server), in a deployment that
    moves KV."""
    if not any(group.role in ("prefill", "decode") for group in cfg.instances):
        return []  # colocated_warnings
    connector = cfg.kv_transfer.connector
    return [problem(f"kv_transfer.{name}", f"has no effect with the {connector} connector: only "
                    f"{' and '.join(readers)} read{'s' if len(readers) == 1 else ''} it",
                    "drop it, or choose that connector (--kv-connector)")
            for name, readers in _CONNECTOR_FIELDS.items()
            if name in cfg.kv_transfer.model_fields_set and connector not in readers]
