"""Deployment config: one pydantic model per concern, composed into `DeploymentConfig`.

Field names are the YAML keys. Every CLI flag maps onto one of them (see `pdlaunch.config.flags`).
Cross-field rules live in `pdlaunch.config.validate`; these models only check single values. The sections:
engine_config.py (`model`, `cache`, `scheduler`), topology_config.py (`parallel`, `instances`),
kv_transfer_config.py, proxy_config.py, launcher_config.py (`launcher`, `supervision`, `security`), on the base
and field types of strict_model.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from pdlaunch.config.engine_config import CacheConfig, ModelConfig, SchedulerConfig
from pdlaunch.config.instance_names import instance_name
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.config.launcher_config import LauncherConfig, SecurityConfig, SupervisionConfig
from pdlaunch.config.proxy_config import ProxyConfig
from pdlaunch.config.strict_model import Device, KVCacheDType, Role, StrictModel
from pdlaunch.config.topology_config import InstanceGroupConfig, ParallelConfig
from pdlaunch.errors import PdlaunchError, error_text

# A pod name as a StatefulSet's pods have one (a DNS-1123 label, their hostname): safe in log lines and file names.
POD_NAME_PATTERN = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_BOOL = TypeAdapter(bool)


def says_colocated(raw: Mapping[str, object]) -> bool:
    """Whether a raw deployment's `colocated` is what the field reads as true: not only YAML's true but also the
    1, "yes" or "on" pydantic takes for it, so that the instances it implies are the ones the field then says."""
    try:
        return _BOOL.validate_python(raw.get("colocated", False))
    except ValidationError:  # reported by the field itself
        return False


def default_instances() -> list[InstanceGroupConfig]:
    return [InstanceGroupConfig(role="prefill"), InstanceGroupConfig(role="decode")]


class DeploymentConfig(StrictModel):
    device: Device = Field("auto", description="auto picks cuda when available, else cpu.")
    colocated: bool = Field(False, description="One instance doing both phases, no KV transfer.")
    log_dir: str = Field("logs", description="One log file per instance is written here; it must be yours "
                         "and not writable by group or others (serve makes a missing one with mode 0750).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    kv_transfer: KVTransferConfig = Field(default_factory=KVTransferConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    instances: list[InstanceGroupConfig] = Field(default_factory=default_instances)

    @model_validator(mode="before")
    @classmethod
    def _colocated_default_instances(cls, data: object) -> object:
        # Without an explicit `instances`, a colocated deployment is one colocated instance.
        if isinstance(data, dict) and says_colocated(data) and "instances" not in data:
            return {**data, "instances": [{"role": "colocated"}]}
        return data


class InstanceSpec(StrictModel):
    """What one instance process needs to know about itself; produced by the launcher."""

    role: Role
    index: int = 0  # its number among the deployment's instances of its role (config/instance_names.py)
    host: str = "127.0.0.1"
    port: int
    tp: int = 1
    expert_parallel: bool = False
    kv_cache_dtype: KVCacheDType | None = None  # None: the deployment's cache.kv_cache_dtype
    devices: list[int] = Field(default_factory=list)
    device: Literal["cpu", "cuda"] = "cpu"
    engine_id: str
    side_channel_port: int | None = None
    master_port: int | None = None
    # Under Kubernetes: the instance's leader pod (render/instance_groups.py), whose name is the instance's in every
    # pod of it, as `kubectl get pods` shows it; None elsewhere: `<role>-<index>`.
    pod: str | None = None

    @field_validator("pod")
    @classmethod
    def _pod_name(cls, value: str | None) -> str | None:
        if value is not None and POD_NAME_PATTERN.fullmatch(value) is None:
            left = " (a $(VAR) the kubelet left as it is: the container has no such variable)" if "$(" in value else ""
            raise ValueError(f"{value!r} is not a pod name{left}; the instance takes it as its name, in its log lines "
                             "and file names, so it must be a DNS label: at most 63 lowercase letters, digits and "
                             "'-', starting and ending with a letter or digit")
        return value

    @property
    def name(self) -> str:
        return self.pod if self.pod is not None else instance_name(self.role, self.index)


def instance_spec_from_json(text: str) -> InstanceSpec:
    """An instance process's `--instance` JSON. Raises PdlaunchError naming the field where it is not an
    InstanceSpec (say `pod`: a Kubernetes $(POD_NAME) the kubelet did not expand)."""
    try:
        return InstanceSpec.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PdlaunchError(error_text(first), field=".".join(str(p) for p in first["loc"]) or None) from None


def instance_cache(config: DeploymentConfig, instance: InstanceSpec | None) -> CacheConfig:
    """The cache settings one instance runs with: the deployment's, with its group's KV cache dtype."""
    if instance is None or instance.kv_cache_dtype is None:
        return config.cache
    return config.cache.model_copy(update={"kv_cache_dtype": instance.kv_cache_dtype})


def proxy_policy_args(cfg: DeploymentConfig, tokenizer: Callable[[], str]) -> list[str]:
    """The proxy's routing, timeout, size and failure flags from the deployment (`python -m pdlaunch.proxy`),
    one list for every way it is started (the local and Ray launchers, the Kubernetes manifests).
    `tokenizer()`: the model path as the proxy will read it, asked for only when routing needs token ids."""
    proxy = cfg.proxy
    args = ["--routing-policy", proxy.routing_policy, "--request-timeout", str(proxy.request_timeout_seconds),
            "--max-request-bytes", str(cfg.security.max_request_bytes),
            "--health-timeout", str(proxy.health_timeout_seconds),
            "--load-failure-policy", cfg.kv_transfer.load_failure_policy,
            "--migration-limit", str(proxy.migration_limit)]
    if proxy.workers != 1:  # auto: resolved by the proxy process, from the CPUs where it runs
        args += ["--workers", str(proxy.workers)]
    if proxy.prefill_timeout_seconds is not None:
        args += ["--prefill-timeout", str(proxy.prefill_timeout_seconds)]
    if proxy.disaggregate_min_tokens is not None:
        args += ["--disaggregate-min-tokens", str(proxy.disaggregate_min_tokens)]
    if proxy.disaggregate_max_queue_tokens is not None:
        args += ["--disaggregate-max-queue-tokens", str(proxy.disaggregate_max_queue_tokens)]
    if proxy.disaggregate_max_itl_ms is not None:
        args += ["--disaggregate-max-itl-ms", repr(proxy.disaggregate_max_itl_ms)]
    if proxy.disaggregate_min_tokens is not None or proxy.routing_policy == "prefix":
        args += ["--tokenizer", tokenizer()]  # the instances' own
        if cfg.model.chat_template is not None:  # and their chat template: the prompts' ids are theirs
            args += ["--chat-template", cfg.model.chat_template]
    return args
