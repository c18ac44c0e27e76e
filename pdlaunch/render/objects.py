"""The core Kubernetes objects of `pdlaunch render kubernetes` (render/kubernetes.py): object metadata,
the engine container and pod template of an instance's pods, the Service per role, the proxy's
Deployment and Service, and the Secret. TypedDicts of the fields we write, in the shape of the
Kubernetes API (checked against its JSON schemas in tests/render); the pod template travels inside
the typed LeaderWorkerSet (render/lws.py), which validates it with pydantic (an unknown key is an error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import ConfigDict, with_config
from typing_extensions import NotRequired, TypedDict  # pydantic reads these TypedDicts (Python 3.11)

from pdlaunch.config.deployment_config import DeploymentConfig, proxy_policy_args

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
class Probe(TypedDict):
    httpGet: HttpGet
    periodSeconds: int
    timeoutSeconds: NotRequired[int]
    failureThreshold: NotRequired[int]


@with_config(_STRICT)
class Resources(TypedDict):
    requests: dict[str, str]
    limits: dict[str, str]


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


@with_config(_STRICT)
class SecretVolumeSource(TypedDict):
    secretName: str


@with_config(_STRICT)
class EmptyDirVolumeSource(TypedDict):
    medium: str


@with_config(_STRICT)
class Volume(TypedDict):
    name: str
    secret: NotRequired[SecretVolumeSource]
    emptyDir: NotRequired[EmptyDirVolumeSource]


@with_config(_STRICT)
class PodSpec(TypedDict):
    containers: list[Container]
    volumes: NotRequired[list[Volume]]


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


CONFIG_DIR = "/etc/pdlaunch"
DEPLOYMENT_FILE = f"{CONFIG_DIR}/deployment.json"
SECRET_ENV = "PDLAUNCH_DEPLOYMENT_SECRET"
API_KEY_ENV = "PDLAUNCH_API_KEY"
PLACEMENT_ENV = "PDLAUNCH_TP_PLACEMENT"  # as distributed/placement.py reads it
TP_SECRET_ENV = "PDLAUNCH_TP_SECRET"  # as distributed/placement.py mixes it into the TP rank link's key
GPU_RESOURCE = "nvidia.com/gpu"
ROLE_LABEL = "pdlaunch.io/role"
LEADER_LABEL = "pdlaunch.io/leader"
# A digest of the Secret's data on every pod that reads it: a pod reads the Secret only when it starts, so a render
# with another secret or API key must change the pod templates for `kubectl apply` to replace the pods (else a
# proxy that kept the old deployment secret is refused by every instance pod started since).
SECRET_DIGEST_ANNOTATION = "pdlaunch.io/secret-digest"


NAME_MAX = 40  # `NAME-colocated-G`, a LeaderWorkerSet's (so its StatefulSets') name, must stay within 52
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # DNS-1035 label (Service names), also a label value
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # DNS-1123 label
# An image reference as the kubelet parses it (distribution/reference): [DOMAIN[:PORT]/]PATH[:TAG][@DIGEST].
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(rf"(?P<name>(?:{_DOMAIN}/)?{_PATH}(?:/{_PATH})*)(?::[\w][\w.-]{{0,127}})?"
                    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?", re.ASCII)


def option_problems(image: str, name: str, namespace: str | None) -> list[tuple[str, str]]:
    """What Kubernetes would refuse in the flags of `pdlaunch render kubernetes`: (flag, message with the fix)."""
    problems: list[tuple[str, str]] = []
    if not _NAME.fullmatch(name) or len(name) > NAME_MAX:
        problems.append(("--name", f"{name!r} cannot prefix the objects' names (and be their label value): use "
                         f"lowercase letters, digits and '-', starting with a letter and ending with a letter or "
                         f"digit, at most {NAME_MAX} characters (got {len(name)}), e.g. --name pd-llama"))
    if namespace is not None and (not _NAMESPACE.fullmatch(namespace) or len(namespace) > 63):
        problems.append(("--namespace", f"{namespace!r} is not a Kubernetes namespace: use lowercase letters, "
                         "digits and '-', starting and ending with a letter or digit, at most 63 characters; "
                         "leave --namespace out for kubectl's current namespace"))
    found = _IMAGE.fullmatch(image)
    if found is None or len(found.group("name")) > 255:
        problems.append(("--image", f"{image!r} is not a container image reference: write "
                         "[REGISTRY[:PORT]/]REPOSITORY[:TAG][@sha256:DIGEST], the repository in lowercase, "
                         "e.g. --image registry.example.com/team/pdlaunch:1.0"))
    return problems


@dataclass(frozen=True)
class RenderOptions:
    image: str  # a container image with pdlaunch (and the checkpoint, or a volume mounted at model.path)
    name: str = "pdlaunch"  # prefix of every object's name
    namespace: str | None = None
    gpus_per_node: int = 8  # a TP group larger than this is spread one rank per pod


def meta(name: str, options: RenderOptions, labels: dict[str, str] | None = None) -> Metadata:
    meta: Metadata = {"name": name, "labels": {**app_labels(options), **(labels or {})}}
    if options.namespace:
        meta["namespace"] = options.namespace
    return meta


def app_labels(options: RenderOptions) -> dict[str, str]:
    return {"app.kubernetes.io/name": "pdlaunch", "app.kubernetes.io/instance": options.name}


def pod_env(extra: list[EnvVar] | None = None) -> list[EnvVar]:
    """POD_IP and the pod's identity first: later values and the args refer to them as $(POD_IP)."""
    return [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *(extra or []),
    ]


def secret_env(name: str, key: str, options: RenderOptions) -> EnvVar:
    """The environment variable `name` holding `key` of the deployment's Secret (never the value itself)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": f"{options.name}-deployment", "key": key}}}


def container(options: RenderOptions, module: str, args: list[str],
              env: list[EnvVar], ports: list[ContainerPort], gpus: int, leader: bool) -> Container:
    engine: Container = {
        "name": "engine", "image": options.image, "command": ["python", "-m", module],
        "args": ["--deployment", DEPLOYMENT_FILE, *args], "env": env, "ports": ports,
        "volumeMounts": [{"name": "deployment", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if gpus:
        engine["resources"] = {"requests": {GPU_RESOURCE: str(gpus)}, "limits": {GPU_RESOURCE: str(gpus)}}
    if leader:  # /health answers 200 once the engine is up (and stays open without the API key)
        engine["readinessProbe"] = {"httpGet": {"path": "/health", "port": "http"},
                                    "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3}
    return engine


def pod_template(options: RenderOptions, role: str, engine: Container, leader: bool,
                 secret_digest: str) -> PodTemplateSpec:
    labels = {**app_labels(options), ROLE_LABEL: role, LEADER_LABEL: "true" if leader else "false"}
    return {"metadata": {"labels": labels, "annotations": {SECRET_DIGEST_ANNOTATION: secret_digest}}, "spec": {
        "containers": [engine],
        "volumes": [{"name": "deployment", "secret": {"secretName": f"{options.name}-deployment"}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}],  # TP workers share tensors there
    }}


def role_service(role: str, http_ports: list[int], options: RenderOptions) -> Service:
    """The role's instances (their leader pods) behind one name, on each of its groups' HTTP ports."""
    ports: list[ServicePort] = [{"name": f"http-{port}", "port": port, "targetPort": port, "protocol": "TCP"}
             for port in dict.fromkeys(http_ports)]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": meta(f"{options.name}-{role}", options, {ROLE_LABEL: role}),
            "spec": {"selector": {**app_labels(options), ROLE_LABEL: role, LEADER_LABEL: "true"}, "ports": ports}}


def proxy_deployment(cfg: DeploymentConfig, urls: list[tuple[str, str, str]],
                      options: RenderOptions, secret_digest: str) -> Deployment:
    # The proxy's tokenizer is the model in the image, as the instances read it.
    args = ["--host", "0.0.0.0", "--port", str(cfg.proxy.port), *proxy_policy_args(cfg, lambda: cfg.model.path)]
    for role, name, url in urls:
        args += [f"--{role}", f"{name}={url}"]
    env = [secret_env(SECRET_ENV, "deployment-secret", options)]
    if cfg.security.api_key:
        env.append(secret_env(API_KEY_ENV, "api-key", options))
    labels = {**app_labels(options), ROLE_LABEL: "proxy"}
    proxy: Container = {"name": "proxy", "image": options.image, "command": ["python", "-m", "pdlaunch.proxy"],
                 "args": args, "env": env,
                 "ports": [{"name": "http", "containerPort": cfg.proxy.port, "protocol": "TCP"}],
                 "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5}}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(f"{options.name}-proxy", options,
                                                                             {ROLE_LABEL: "proxy"}),
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": dict(labels),
                                               "annotations": {SECRET_DIGEST_ANNOTATION: secret_digest}},
                                  "spec": {"containers": [proxy]}}}}


def proxy_service(cfg: DeploymentConfig, options: RenderOptions) -> Service:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(f"{options.name}-proxy", options,
                                                                     {ROLE_LABEL: "proxy"}),
            "spec": {"selector": {**app_labels(options), ROLE_LABEL: "proxy"},
                     "ports": [{"name": "http", "port": cfg.proxy.port, "targetPort": "http", "protocol": "TCP"}]}}
