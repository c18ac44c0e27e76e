"""The core Kubernetes objects `pdlaunch render kubernetes` writes, as TypedDicts of the fields we set, in the
shape of the Kubernetes API (checked against its JSON schemas in tests/render). The pod template travels inside
the typed LeaderWorkerSet (render/lws.py), which validates it with pydantic (an unknown key is an error).
"""

from __future__ import annotations

from pydantic import ConfigDict, with_config
from typing_extensions import NotRequired, TypedDict  # pydantic reads these TypedDicts (Python 3.11)

_STRICT = ConfigDict(extra="forbid")


@with_config(_STRICT)
class Metadata(TypedDict):
    name: str
    labels: dict[str, str]
    namespace: NotRequired[str]


@with_config(_STRICT)
class FieldRef(TypedDict):
    fieldPath: str


@with_config(_STRICT)
class SecretKeyRef(TypedDict):
    name: str
    key: str


@with_config(_STRICT)
class EnvVarSource(TypedDict, total=False):
    fieldRef: FieldRef
    secretKeyRef: SecretKeyRef


@with_config(_STRICT)
class EnvVar(TypedDict):
    name: str
    value: NotRequired[str]
    valueFrom: NotRequired[EnvVarSource]


@with_config(_STRICT)
class ContainerPort(TypedDict):
    name: str
    containerPort: int
    protocol: str


@with_config(_STRICT)
class VolumeMount(TypedDict):
    name: str
    mountPath: str
    readOnly: NotRequired[bool]


@with_config(_STRICT)
class HttpGet(TypedDict):
    path: str
    port: str


@with_config(_STRICT)
class ExecAction(TypedDict):
    command: list[str]


@with_config(_STRICT)
class Probe(TypedDict):
    httpGet: NotRequired[HttpGet]
    exec: NotRequired[ExecAction]
    periodSeconds: int
    timeoutSeconds: NotRequired[int]
    failureThreshold: NotRequired[int]


@with_config(_STRICT)
class Resources(TypedDict):
    requests: dict[str, str]
    limits: NotRequired[dict[str, str]]


@with_config(_STRICT)
class Container(TypedDict):
    name: str
    image: str
    command: list[str]
    args: list[str]
    env: list[EnvVar]
    ports: list[ContainerPort]
    volumeMounts: NotRequired[list[VolumeMount]]
    resources: NotRequired[Resources]
    readinessProbe: NotRequired[Probe]
    livenessProbe: NotRequired[Probe]
    startupProbe: NotRequired[Probe]


@with_config(_STRICT)
class SecretVolumeSource(TypedDict):
    secretName: str


@with_config(_STRICT)
class EmptyDirVolumeSource(TypedDict):
    medium: str


@with_config(_STRICT)
class PersistentVolumeClaimVolumeSource(TypedDict):
    claimName: str
    readOnly: bool


@with_config(_STRICT)
class HostPathVolumeSource(TypedDict):
    path: str
    type: str


@with_config(_STRICT)
class Volume(TypedDict):
    name: str
    secret: NotRequired[SecretVolumeSource]
    emptyDir: NotRequired[EmptyDirVolumeSource]
    persistentVolumeClaim: NotRequired[PersistentVolumeClaimVolumeSource]
    hostPath: NotRequired[HostPathVolumeSource]


@with_config(_STRICT)
class PodSpec(TypedDict):
    containers: list[Container]
    volumes: NotRequired[list[Volume]]
    terminationGracePeriodSeconds: NotRequired[int]


@with_config(_STRICT)
class PodMetadata(TypedDict):
    labels: dict[str, str]
    annotations: NotRequired[dict[str, str]]


@with_config(_STRICT)
class PodTemplateSpec(TypedDict, total=False):  # the API has every field optional
    metadata: PodMetadata
    spec: PodSpec


class ServicePort(TypedDict):
    name: str
    port: int
    targetPort: int | str
    protocol: str


class ServiceSpec(TypedDict):
    selector: dict[str, str]
    ports: list[ServicePort]


class Service(TypedDict):
    apiVersion: str
    kind: str
    metadata: Metadata
    spec: ServiceSpec


class LabelSelector(TypedDict):
    matchLabels: dict[str, str]


class DeploymentSpec(TypedDict):
    replicas: int
    selector: LabelSelector
    template: PodTemplateSpec


class Deployment(TypedDict):
    apiVersion: str
    kind: str
    metadata: Metadata
    spec: DeploymentSpec


class Secret(TypedDict):
    apiVersion: str
    kind: str
    metadata: Metadata
    type: str
    stringData: dict[str, str]

