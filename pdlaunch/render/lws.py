"""A typed model of the LeaderWorkerSet API (leaderworkerset.x-k8s.io/v1, kubernetes-sigs/lws).

The Kubernetes JSON schemas cover only the core objects; a LeaderWorkerSet is a custom resource,
so `pdlaunch render kubernetes` builds its LeaderWorkerSets through these models (field names and
enums as the LWS CRD declares them; an unknown field is an error) and the tests read the written
manifests back through them. The pod templates inside are core PodTemplateSpecs, checked against the
Kubernetes schemas in the tests.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.alias_generators import to_camel

from pdlaunch.render.core_api import PodTemplateSpec

# What LWS sets on every container of a group (the leader's address is the group's rendezvous).
LEADER_ADDRESS_ENV = "LWS_LEADER_ADDRESS"
WORKER_INDEX_ENV = "LWS_WORKER_INDEX"
# What LWS annotates each worker pod with: its group's leader pod's name (kubernetes-sigs/lws,
# LeaderPodNameAnnotationKey); a container reads it through the downward API.
LEADER_NAME_ANNOTATION = "leaderworkerset.sigs.k8s.io/leader-name"


class LwsModel(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class ObjectMeta(LwsModel):
    name: str = Field(pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] | None = None


class SubGroupPolicy(LwsModel):
    sub_group_policy_type: Literal["LeaderWorker", "LeaderExcluded"] | None = None
    sub_group_size: int | None = Field(None, ge=1)


class LeaderWorkerTemplate(LwsModel):
    leader_template: PodTemplateSpec | None = None  # default: the worker template
    worker_template: PodTemplateSpec
    size: int | None = Field(None, ge=1, description="Pods per group, the leader included.")
    restart_policy: Literal["Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"] | None = None
    sub_group_policy: SubGroupPolicy | None = None
    volume_claim_templates: list[dict[str, JsonValue]] | None = None  # core PersistentVolumeClaims


class RollingUpdateConfiguration(LwsModel):
    partition: int | None = Field(None, ge=0)
    max_unavailable: int | str | None = None
    max_surge: int | str | None = None


class RolloutStrategy(LwsModel):
    type: Literal["RollingUpdate"] = "RollingUpdate"
    rolling_update_configuration: RollingUpdateConfiguration | None = None


class NetworkConfig(LwsModel):
    subdomain_policy: Literal["Shared", "UniquePerReplica"] | None = None


class LeaderWorkerSetSpec(LwsModel):
    replicas: int | None = Field(None, ge=0, description="Groups (here: instances).")
    leader_worker_template: LeaderWorkerTemplate
    rollout_strategy: RolloutStrategy | None = None
    startup_policy: Literal["LeaderCreated", "LeaderReady"] | None = None
    network_config: NetworkConfig | None = None


class LeaderWorkerSet(LwsModel):
    api_version: Literal["leaderworkerset.x-k8s.io/v1"] = "leaderworkerset.x-k8s.io/v1"
    kind: Literal["LeaderWorkerSet"] = "LeaderWorkerSet"
    metadata: ObjectMeta
    spec: LeaderWorkerSetSpec

    def manifest(self) -> dict[str, JsonValue]:
        """The object as Kubernetes reads it (camelCase keys, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True)
