"""Where the instances run and how each is split: the `parallel` section (TP sizes, nodes) and the `instances`
groups, with the settings a group may take from the deployment's."""

from __future__ import annotations

from pydantic import Field

from pdlaunch.config.addresses import Host
from pdlaunch.config.engine_config import CacheConfig
from pdlaunch.config.strict_model import MAX_SECONDS, DeviceIndex, KVCacheDType, Role, StrictModel

# How long a TP group's ranks wait for each other to start and join, unless parallel.rendezvous_timeout_seconds says.
DEFAULT_RENDEZVOUS_TIMEOUT_S = 120.0


class NodeConfig(StrictModel):
    address: Host = Field(..., description="Address other nodes reach this node at.")
    devices: list[DeviceIndex] = Field(default_factory=list, description="CUDA device indices on this node (0 "
                                       "and up).")


class ParallelConfig(StrictModel):
    tp: int = Field(1, gt=0, description="Default tensor-parallel size of every instance.")
    prefill_tp: int | None = Field(None, gt=0, description="TP size of prefill instances (default: tp).")
    decode_tp: int | None = Field(None, gt=0, description="TP size of decode instances (default: tp).")
    enable_expert_parallel: bool = Field(
        False, description="MoE models: place whole experts on each TP rank (the number of experts must divide by "
        "the TP size) instead of splitting every expert's intermediate dimension (the default).")
    nodes: list[NodeConfig] = Field(default_factory=list, description="Multi-node: one entry per node.")
    node_rank: int = Field(0, ge=0, description="Which entry of `nodes` this process runs.")
    master_addr: Host = Field("127.0.0.1", description="torch.distributed rendezvous address.")
    master_port: int | None = Field(None, description="Rendezvous port; default: a free port.")
    rendezvous_timeout_seconds: float = Field(
        DEFAULT_RENDEZVOUS_TIMEOUT_S, gt=0, le=MAX_SECONDS, description="TP groups: how long rank 0 waits for its "
        "other ranks to connect, then again for them to come to the join, and a rank for rank 0 (at most a week). "
        "Raise it where a rank's node or pod may start minutes late (an image pull, a pod waiting to be scheduled); "
        "the Kubernetes manifests use 900 unless it is set. Under `pdlaunch serve` keep it below 900: the launcher "
        "gives an instance that long to be ready (check-config warns).")


class InstanceGroupConfig(StrictModel):
    role: Role
    count: int = Field(1, ge=0, description="Number of instances in this group.")
    tp: int | None = Field(None, gt=0, description="TP size (default: parallel.prefill_tp/decode_tp/tp).")
    enable_expert_parallel: bool | None = Field(
        None, description="MoE models: whole experts per TP rank in this group (default: "
        "parallel.enable_expert_parallel). Prefill and decode may differ; KV transfer is unchanged.")
    kv_cache_dtype: KVCacheDType | None = Field(
        None, description="This group's KV cache element type (default: cache.kv_cache_dtype). Colocated groups "
        "may differ (e.g. an fp8 group next to a bf16 one behind one proxy); prefill and decode groups must agree, "
        "since KV moves between them as stored.")
    devices: list[DeviceIndex] | None = Field(None, description="CUDA devices for the group (indices, 0 and up), "
                                              "tp per instance, in order. Default: the GPUs of its node that no "
                                              "group lists, in order.")
    node: int = Field(0, ge=0, description="Index into parallel.nodes where the group runs.")
    base_port: int | None = Field(None, description="First HTTP port of the group; default: free ports.")
    restart: bool = Field(True, description="Restart a dead instance of this group (with backoff) instead of "
                                            "stopping the deployment.")


def group_kv_cache_dtype(cache: CacheConfig, group: InstanceGroupConfig) -> KVCacheDType:
    """The group's KV cache dtype: its own setting, else the deployment's."""
    return cache.kv_cache_dtype if group.kv_cache_dtype is None else group.kv_cache_dtype


def group_expert_parallel(parallel: ParallelConfig, group: InstanceGroupConfig) -> bool:
    """The group's expert-parallel mode: its own setting, else the deployment's."""
    return parallel.enable_expert_parallel if group.enable_expert_parallel is None else group.enable_expert_parallel


def group_tp_field(parallel: ParallelConfig, group: InstanceGroupConfig, index: int) -> str:
    """The config path the group's TP size comes from, for a problem to name what the user set: the group's own
    `instances[<index>].tp` where the user set it (a resolved group's tp is in its fields_set only then:
    validate.resolve), else its role's parallel.prefill_tp / decode_tp where set, else parallel.tp."""
    if group.tp is not None and "tp" in group.model_fields_set:
        return f"instances[{index}].tp"
    role_tp = {"prefill": "prefill_tp", "decode": "decode_tp"}.get(group.role)
    if role_tp is not None and getattr(parallel, role_tp) is not None:
        return f"parallel.{role_tp}"
    return "parallel.tp"
