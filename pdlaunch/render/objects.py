"""The core Kubernetes objects of `pdlaunch render kubernetes` (render/kubernetes.py): object metadata,
the engine container and pod template of an instance's pods, the Service per role, the proxy's
Deployment and Service. Their shapes are the TypedDicts of render/core_api.py.
"""

from __future__ import annotations

import math

from pdlaunch.config.deployment_config import DeploymentConfig, proxy_policy_args
from pdlaunch.config.launcher_config import DRAIN_TIMEOUT_S
from pdlaunch.render.core_api import (
    Container,
    ContainerPort,
    Deployment,
    EnvVar,
    Metadata,
    PodSpec,
    PodTemplateSpec,
    Resources,
    Service,
    ServicePort,
    Volume,
    VolumeMount,
)
from pdlaunch.render.options import RenderOptions

CONFIG_DIR = "/etc/pdlaunch"
SHM_DIR = "/dev/shm"
POD_MOUNTS = (CONFIG_DIR, SHM_DIR)  # what the engine pods mount besides the model volume
DEPLOYMENT_FILE = f"{CONFIG_DIR}/deployment.json"
SECRET_ENV = "PDLAUNCH_DEPLOYMENT_SECRET"
API_KEY_ENV = "PDLAUNCH_API_KEY"
PLACEMENT_ENV = "PDLAUNCH_TP_PLACEMENT"  # as distributed/placement.py reads it
TP_SECRET_ENV = "PDLAUNCH_TP_SECRET"  # as distributed/placement.py mixes it into the TP rank link's key
ROLE_LABEL = "pdlaunch.io/role"
LEADER_LABEL = "pdlaunch.io/leader"
# A digest of the Secret's data on every pod that reads it: a pod reads the Secret only when it starts, so a render
# with another secret or API key must change the pod templates for `kubectl apply` to replace the pods (else a
# proxy that kept the old deployment secret is refused by every instance pod started since).
SECRET_DIGEST_ANNOTATION = "pdlaunch.io/secret-digest"
POD_GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds
PROXY_STOP_MARGIN_S = 15.0  # past the proxy's drain: its lifespan's end and a supervisor's reaping of workers


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


def literal(text: str) -> str:
    """`text` as a container's args must carry it for the process to get it as written: the kubelet replaces `$$`
    with `$` and `$(VAR)` with the container's variable VAR (a secret among them) in every arg."""
    return text.replace("$", "$$")


def secret_env(name: str, key: str, options: RenderOptions) -> EnvVar:
    """The environment variable `name` holding `key` of the deployment's Secret (never the value itself)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": f"{options.name}-deployment", "key": key}}}


def container(options: RenderOptions, module: str, args: list[str],
              env: list[EnvVar], ports: list[ContainerPort], resources: Resources, leader: bool) -> Container:
    mounts: list[VolumeMount] = [{"name": "deployment", "mountPath": CONFIG_DIR, "readOnly": True},
                                 {"name": "dshm", "mountPath": SHM_DIR}]
    if options.model_volume is not None:  # every engine pod (each role, each TP rank's) reads the checkpoint
        mounts.append(options.model_volume.mount())
    engine: Container = {
        "name": "engine", "image": options.image, "command": ["python", "-m", module],
        "args": ["--deployment", DEPLOYMENT_FILE, *args], "env": env, "ports": ports, "volumeMounts": mounts,
        "resources": resources,  # render/pod_resources.py
    }
    if leader:  # /health answers 200 once the engine is up (and stays open without the API key)
        engine["readinessProbe"] = {"httpGet": {"path": "/health", "port": "http"},
                                    "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3}
    return engine


def pod_template(options: RenderOptions, role: str, engine: Container, leader: bool,
                 secret_digest: str) -> PodTemplateSpec:
    labels = {**app_labels(options), ROLE_LABEL: role, LEADER_LABEL: "true" if leader else "false"}
    volumes: list[Volume] = [{"name": "deployment", "secret": {"secretName": f"{options.name}-deployment"}},
                             {"name": "dshm", "emptyDir": {"medium": "Memory"}}]  # TP workers share tensors there
    if options.model_volume is not None:
        volumes.append(options.model_volume.volume())
    return {"metadata": {"labels": labels, "annotations": {SECRET_DIGEST_ANNOTATION: secret_digest}}, "spec": {
        "containers": [engine], "volumes": volumes}}


def role_service(role: str, http_ports: list[int], options: RenderOptions) -> Service:
    """The role's instances (their leader pods) behind one name, on each of its groups' HTTP ports. Each port leads
    to the port named `http` in every pod: a Service sends each of its ports to all the pods it selects, and groups
    of a role may bind different HTTP ports (a numeric targetPort would reach only its own group's pods)."""
    ports: list[ServicePort] = [{"name": f"http-{port}", "port": port, "targetPort": "http", "protocol": "TCP"}
                                for port in dict.fromkeys(http_ports)]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": meta(f"{options.name}-{role}", options, {ROLE_LABEL: role}),
            "spec": {"selector": {**app_labels(options), ROLE_LABEL: role, LEADER_LABEL: "true"}, "ports": ports}}


def proxy_deployment(cfg: DeploymentConfig, urls: list[tuple[str, str, str]], engine_ids: dict[str, str],
                     options: RenderOptions, secret_digest: str) -> Deployment:
    """The proxy's pod: `urls` are (role, instance name, URL), `engine_ids` instance name -> the engine_id its
    /health must name (a * for the pod's UID)."""
    tokenizes: list[bool] = []  # proxy_policy_args asks for the model's path only when the proxy tokenizes

    def tokenizer() -> str:  # the model's path in the pod, as the instances read it
        tokenizes.append(True)
        return cfg.model.path

    args = ["--host", "0.0.0.0", "--port", str(cfg.proxy.port), *proxy_policy_args(cfg, tokenizer)]
    drain_s = cfg.supervision.drain_timeout_seconds
    if drain_s != DRAIN_TIMEOUT_S:
        args += ["--drain-timeout", str(drain_s)]
    for role, name, url in urls:
        args += [f"--{role}", f"{name}={url}"]
    for name, engine_id in engine_ids.items():
        args += ["--engine-id", f"{name}={engine_id}"]
    args = [literal(arg) for arg in args]  # none refers to a variable; the config's text (chat template) is kept
    env = [secret_env(SECRET_ENV, "deployment-secret", options)]
    if cfg.security.api_key:
        env.append(secret_env(API_KEY_ENV, "api-key", options))
    labels = {**app_labels(options), ROLE_LABEL: "proxy"}
    proxy: Container = {"name": "proxy", "image": options.image, "command": ["python", "-m", "pdlaunch.proxy"],
                 "args": args, "env": env,
                 "ports": [{"name": "http", "containerPort": cfg.proxy.port, "protocol": "TCP"}],
                 "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5}}
    spec: PodSpec = {"containers": [proxy]}
    if drain_s + PROXY_STOP_MARGIN_S > POD_GRACE_S:  # the kubelet's SIGKILL would cut the drain short
        spec["terminationGracePeriodSeconds"] = math.ceil(drain_s + PROXY_STOP_MARGIN_S)
    if tokenizes and options.model_volume is not None:  # its tokenizer is the checkpoint's, on the volume
        proxy["volumeMounts"] = [options.model_volume.mount()]
        spec["volumes"] = [options.model_volume.volume()]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(f"{options.name}-proxy", options,
                                                                             {ROLE_LABEL: "proxy"}),
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": dict(labels),
                                               "annotations": {SECRET_DIGEST_ANNOTATION: secret_digest}},
                                  "spec": spec}}}


def proxy_service(cfg: DeploymentConfig, options: RenderOptions) -> Service:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(f"{options.name}-proxy", options,
                                                                     {ROLE_LABEL: "proxy"}),
            "spec": {"selector": {**app_labels(options), ROLE_LABEL: "proxy"},
                     "ports": [{"name": "http", "port": cfg.proxy.port, "targetPort": "http", "protocol": "TCP"}]}}
