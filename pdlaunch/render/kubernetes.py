"""`pdlaunch render kubernetes`: the manifests of a deployment for a Kubernetes cluster with LeaderWorkerSet.

What the launcher does on one host, Kubernetes does here; the objects, in apply order:

- Secret `NAME-deployment`: the validated deployment as JSON (it carries the deployment secret, so it
  is a Secret, not a ConfigMap), the deployment secret alone for the proxy (and for the rank link of a TP
  group spread over pods, PDLAUNCH_TP_SECRET), and the API key if any.
- One LeaderWorkerSet per instance group: a replica per instance, its leader pod is TP rank 0 (the
  instance's HTTP server and engine). A TP group that fits one node (tp <= --gpus-per-node) is one
  pod holding all its GPUs; a larger one is one pod per rank, the workers being
  `pdlaunch.distributed.remote_rank` processes that rendezvous at `LWS_LEADER_ADDRESS`. The LWS controller
  makes a StatefulSet of each group's workers named after its leader pod (`<lws>-<k>`): --name is refused
  when one would pass the 52 characters a StatefulSet's pods can be labelled with.
  Each pod advertises its own `status.podIP` (downward API) for HTTP and the KV side channel.
- A Service per role (its instances' leader pods), then the proxy's Deployment and Service. The proxy
  names each instance by its leader's DNS name in the LeaderWorkerSet's headless service.

Ports come from the port plan (config/port_plan.py): a group's HTTP port is its instance 0's, the KV
side channel's and the rendezvous' are the plan's first ones. Every instance is a pod of its own
(its own address), so all replicas of a group bind the same ports; ports the config leaves to be
picked free get the fixed defaults below, as a pod must declare them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.port_plan import PlannedInstance, plan_instances
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.rules.host import make_output_dir
from pdlaunch.config.rules.security import MIN_SECRET_CHARS
from pdlaunch.config.topology_config import InstanceGroupConfig, group_expert_parallel, group_kv_cache_dtype
from pdlaunch.errors import PdlaunchError
from pdlaunch.render.lws import (
    LEADER_ADDRESS_ENV,
    WORKER_INDEX_ENV,
    LeaderWorkerSet,
    LeaderWorkerSetSpec,
    LeaderWorkerTemplate,
    ObjectMeta,
)
from pdlaunch.render.objects import (
    PLACEMENT_ENV,
    ROLE_LABEL,
    SECRET_ENV,
    TP_SECRET_ENV,
    ContainerPort,
    Deployment,
    RenderOptions,
    Secret,
    Service,
    app_labels,
    container,
    meta,
    pod_env,
    pod_template,
    proxy_deployment,
    proxy_service,
    role_service,
    secret_env,
)

DEFAULT_HTTP_PORT = 8100  # group g: 8100 + 100 * g, when base_port is unset
DEFAULT_SIDE_CHANNEL_PORT = 5600
DEFAULT_MASTER_PORT = 29500
# The StatefulSet controller labels each pod `controller-revision-hash: <StatefulSet>-<10-character hash>`, at most
# 63 characters: a longer StatefulSet gets no pod at all (kubernetes/kubernetes#64023).
STATEFULSET_NAME_MAX = 52
Manifest = Secret | LeaderWorkerSet | Service | Deployment  # in apply order
_MANIFEST_FILE = re.compile(r"\d{2,}-(secret|leaderworkerset|service|deployment)-[-a-z0-9]+\.yaml")


@dataclass
class GroupPorts:
    http: int
    side_channel: int
    master: int


def deployment_secret(cfg: DeploymentConfig) -> str:
    """The config's deployment secret, else PDLAUNCH_DEPLOYMENT_SECRET, else a fresh one (written into the Secret).
    Raises PdlaunchError naming the variable when it holds one shorter than the config's own minimum."""
    if cfg.security.deployment_secret:
        return cfg.security.deployment_secret
    given = os.environ.get(SECRET_ENV)
    if given and len(given) < MIN_SECRET_CHARS:
        raise PdlaunchError(f"is {len(given)} characters, fewer than {MIN_SECRET_CHARS}", field=SECRET_ENV,
                            hint="use a longer random value, e.g. `python -c 'import secrets; "
                            "print(secrets.token_hex(32))'`, or unset it for a fresh one")
    return given or secrets.token_hex(32)


def render_kubernetes(cfg: DeploymentConfig, options: RenderOptions) -> list[Manifest]:
    """Every manifest of the (resolved: device, dtype and per-group TP concrete) deployment, in apply order."""
    _check_statefulset_names(cfg, options)
    secret = deployment_secret(cfg)
    pod_cfg = _pod_config(cfg, secret)
    planned = plan_instances(cfg, [], strict=False)
    secret_object = _secret(cfg, pod_cfg, secret, options)
    digest = hashlib.sha256(json.dumps(secret_object["stringData"], sort_keys=True).encode()).hexdigest()[:16]
    manifests: list[Manifest] = [secret_object]
    urls: list[tuple[str, str, str]] = []  # (role, instance name, URL) for the proxy
    groups = [(g, group) for g, group in enumerate(cfg.instances) if group.count > 0]
    for g, group in groups:
        ports = _group_ports(cfg, g, [p for p in planned if p.group == g])
        lws = _leader_worker_set(cfg, g, group, ports, options, digest)
        manifests.append(lws)
        lws_name = lws.metadata.name
        for k in range(group.count):  # LWS names leader k `<lws>-<k>` in the headless service `<lws>`
            urls.append((group.role, f"{group.role}-{g}-{k}", f"http://{lws_name}-{k}.{lws_name}:{ports.http}"))
    for role in dict.fromkeys(group.role for _, group in groups):
        http_ports = [_group_ports(cfg, g, [p for p in planned if p.group == g]).http
                      for g, group in groups if group.role == role]
        manifests.append(role_service(role, http_ports, options))
    manifests += [proxy_deployment(cfg, urls, options, digest), proxy_service(cfg, options)]
    return manifests


def _lws_name(options: RenderOptions, role: str, g: int) -> str:
    return f"{options.name}-{role}-{g}"


def _spread(cfg: DeploymentConfig, group: InstanceGroupConfig, options: RenderOptions) -> bool:
    """One pod per TP rank: the group's TP does not fit one node."""
    return cfg.device == "cuda" and (group.tp or 1) > options.gpus_per_node


def _check_statefulset_names(cfg: DeploymentConfig, options: RenderOptions) -> None:
    """Raise PdlaunchError (--name) unless every StatefulSet the LWS controller makes gets pods: its leaders' one
    takes the LeaderWorkerSet's name, and a group of several pods a workers' one named after its leader pod."""
    names = []
    for g, group in enumerate(cfg.instances):
        if group.count > 0:
            lws = _lws_name(options, group.role, g)
            names.append(f"{lws}-{group.count - 1}" if _spread(cfg, group, options) else lws)
    longest = max(names, key=len, default="")
    excess = len(longest) - STATEFULSET_NAME_MAX
    if excess > 0:
        fix = (f"use a --name of at most {len(options.name) - excess} characters" if excess < len(options.name)
               else "use fewer instances per group")
        raise PdlaunchError(f"{options.name!r} makes the LeaderWorkerSet controller create the StatefulSet "
                            f"{longest!r} ({len(longest)} characters), whose pods Kubernetes cannot label: a "
                            f"StatefulSet's name takes at most {STATEFULSET_NAME_MAX}", field="--name", hint=fix)


def storage_connector_problems(cfg: DeploymentConfig) -> list[Problem]:
    """PD over the storage connector: prefill pods would write KV files to their own filesystem and decode pods look
    in theirs (the manifests mount no shared volume), so every prompt would be computed twice."""
    if cfg.colocated or cfg.kv_transfer.connector != "storage":
        return []
    return [problem("kv_transfer.connector", "'storage' passes KV through files in kv_transfer.storage_path, and "
                    "every pod has its own filesystem: decode pods would never find what prefill pods stored and "
                    "would compute every prompt again", "use connector 'nixl' (or 'mooncake') in Kubernetes")]


def pod_port_problems(cfg: DeploymentConfig, gpus_per_node: int) -> list[Problem]:
    """Ports the pods declare outside 1..65535, or twice in a leader pod (a group's HTTP port on its KV
    side channel's or rendezvous port), named by the config field that sets them (a port set by the config
    is named before a default it collides with)."""
    fix = "choose ports inside 1..65535, e.g. 8000-20000"
    found: list[Problem] = []
    if not 1 <= cfg.proxy.port <= 65535:
        found.append(problem("proxy.port", f"port {cfg.proxy.port} (proxy) is outside 1..65535", fix))
    planned = plan_instances(cfg, [], strict=False)
    for g, group in enumerate(cfg.instances):
        if group.count == 0:
            continue
        ports = _group_ports(cfg, g, [p for p in planned if p.group == g])
        tp = group.tp or 1
        in_leader = 1 if cfg.device == "cuda" and tp > gpus_per_node else tp  # ranks in the leader pod
        claimed = [  # (set by the config, field, what, every port, the leader pod's)
            (group.base_port is not None, f"instances[{g}].base_port", "HTTP", range(ports.http, ports.http + 1),
             range(ports.http, ports.http + 1))]
        if group.role != "colocated":  # one per TP rank, in the leader pod or in the rank's own
            claimed.append((cfg.kv_transfer.side_channel_port is not None, "kv_transfer.side_channel_port",
                            "KV side channel", range(ports.side_channel, ports.side_channel + tp),
                            range(ports.side_channel, ports.side_channel + in_leader)))
        if tp > 1:
            claimed.append((cfg.parallel.master_port is not None, "parallel.master_port", "rendezvous",
                            range(ports.master, ports.master + 1), range(ports.master, ports.master + 1)))
        claimed.sort(key=lambda c: c[0])  # defaults first
        for i, (given, field, what, used, leader) in enumerate(claimed):
            what = f"instances[{g}] {what}" + ("" if given else ", the default")
            if used[0] < 1 or used[-1] > 65535:
                found.append(problem(field, f"{_label(used)} ({what}) is outside 1..65535", fix))
                continue
            other = next((c for c in claimed[:i] if c[4][0] <= leader[-1] and leader[0] <= c[4][-1]), None)
            if other is not None:
                found.append(problem(field, f"{_label(leader)} ({what}) collides with {other[1]} ({_label(other[4])}"
                                     f"{'' if other[0] else ', the default'}) in the group's leader pods",
                                     "set the ports apart: a pod binds its HTTP port (default 8100 + 100 x group), "
                                     f"a KV side channel port per TP rank (default {DEFAULT_SIDE_CHANNEL_PORT} on) "
                                     f"and the rendezvous port (default {DEFAULT_MASTER_PORT})"))
    return found


def _label(used: range) -> str:
    return f"port {used[0]}" if len(used) == 1 else f"ports {used[0]}-{used[-1]}"


def write_manifests(manifests: list[Manifest], out: Path) -> list[Path]:
    """One YAML file per object, numbered in apply order (`kubectl apply -f DIR` applies them in name order).
    Raises PdlaunchError (field --out) when `out` is not a directory that can be made and written."""
    make_output_dir(out, "--out")
    try:
        return _write_files(manifests, out)
    except OSError as exc:
        raise PdlaunchError(f"cannot write the manifests to {out}: {exc.strerror or exc}"
                            + (f" ({exc.filename})" if exc.filename else ""), field="--out",
                            hint="give a directory you can write to; missing parent directories are made") from None


def _write_files(manifests: list[Manifest], out: Path) -> list[Path]:
    files: list[tuple[Path, object]] = []
    for i, manifest in enumerate(manifests):
        if isinstance(manifest, LeaderWorkerSet):
            kind, name = "leaderworkerset", manifest.metadata.name
            data: object = manifest.manifest()
        else:
            kind, name, data = manifest["kind"].lower(), manifest["metadata"]["name"], manifest
        files.append((out / f"{i:02d}-{kind}-{name}.yaml", data))
    # `kubectl apply -f DIR` would apply an earlier render's objects too (a group since removed, another --name)
    stale = sorted(p.name for p in out.iterdir() if _MANIFEST_FILE.fullmatch(p.name)) if out.is_dir() else []
    stale = [name for name in stale if name not in {path.name for path, _ in files}]
    if stale:
        raise PdlaunchError(f"{out} holds manifests this render does not write ({', '.join(stale[:3])}"
                            + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
                            + "), which `kubectl apply -f` would apply too", field="--out",
                            hint="remove them (kubectl delete -f them first if they were applied) or give "
                            "an empty directory")
    written = []
    for path, data in files:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the Secret's file holds the secret
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        written.append(path)
    return written


def _pod_config(cfg: DeploymentConfig, secret: str) -> DeploymentConfig:
    """The config every pod reads: Kubernetes places the pods, so no node list; the side channel binds
    every interface and each rank advertises its pod's address; TP ranks in the leader pod reach its
    rendezvous store on loopback (ranks in worker pods are given the leader's address)."""
    out = cfg.model_copy(deep=True)
    out.parallel.nodes = []
    out.parallel.node_rank = 0
    out.parallel.master_addr = "127.0.0.1"
    out.kv_transfer.side_channel_host = "0.0.0.0"
    out.security.deployment_secret = secret
    return out


def _group_ports(cfg: DeploymentConfig, g: int, planned: list[PlannedInstance]) -> GroupPorts:
    first = planned[0]
    side = next((s.first for s in first.side_channels if s.first is not None), None)
    return GroupPorts(
        http=first.http_port if first.http_port is not None else DEFAULT_HTTP_PORT + 100 * g,
        side_channel=side if side is not None else DEFAULT_SIDE_CHANNEL_PORT,
        master=first.rendezvous_port if first.rendezvous_port is not None else
        cfg.parallel.master_port or DEFAULT_MASTER_PORT)


def _secret(cfg: DeploymentConfig, pod_cfg: DeploymentConfig, secret: str, options: RenderOptions) -> Secret:
    data = {"deployment.json": pod_cfg.model_dump_json(indent=2), "deployment-secret": secret}
    if cfg.security.api_key:
        data["api-key"] = cfg.security.api_key
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta(f"{options.name}-deployment", options),
            "type": "Opaque", "stringData": data}


def _instance_spec(cfg: DeploymentConfig, group: InstanceGroupConfig, ports: GroupPorts, ranks_here: int,
                   side_channel_port: int) -> InstanceSpec:
    """The instance as its pod sees it. A recreated pod has a new UID, hence a new engine_id (as a
    restart by the local launcher): peers must not reuse what they cached for the dead one."""
    tp = group.tp or 1
    return InstanceSpec(
        role=group.role, index=0, host="$(POD_IP)", port=ports.http, tp=tp,
        expert_parallel=group_expert_parallel(cfg.parallel, group),
        kv_cache_dtype=group_kv_cache_dtype(cfg.cache, group),
        devices=list(range(ranks_here)) if cfg.device == "cuda" else [],
        device="cuda" if cfg.device == "cuda" else "cpu",
        engine_id=f"{cfg.kv_transfer.engine_id}-$(POD_NAME)-$(POD_UID)",
        side_channel_port=None if group.role == "colocated" else side_channel_port,
        master_port=ports.master if tp > 1 else None)


def _ports(ports: GroupPorts, role: str, side_ranks: range, tp: int, leader: bool) -> list[ContainerPort]:
    found: list[ContainerPort] = []
    if leader:
        found.append({"name": "http", "containerPort": ports.http, "protocol": "TCP"})
    if role != "colocated":
        found += [{"name": f"kv-side-{r}", "containerPort": ports.side_channel + r, "protocol": "TCP"}
                  for r in side_ranks]
    if leader and tp > 1:
        found.append({"name": "rendezvous", "containerPort": ports.master, "protocol": "TCP"})
    return found


def _leader_worker_set(cfg: DeploymentConfig, g: int, group: InstanceGroupConfig, ports: GroupPorts,
                       options: RenderOptions, secret_digest: str) -> LeaderWorkerSet:
    tp = group.tp or 1
    spread = _spread(cfg, group, options)
    ranks_here = 1 if spread else tp
    gpus = ranks_here if cfg.device == "cuda" else 0
    spec = _instance_spec(cfg, group, ports, ranks_here, ports.side_channel)
    # The ranks in other pods join rank 0 over the cluster network: without a secret in their link's key, anyone
    # who can read the config's model path and ports could join in their place.
    link_secret = [secret_env(TP_SECRET_ENV, "deployment-secret", options)] if spread else []
    env = pod_env(link_secret)
    if spread:  # ranks 1..tp-1 are the worker pods `<leader pod>-<r>`; rank 0 listens on its pod's address
        hosts = ["$(POD_IP)"] + [f"$(POD_NAME)-{r}" for r in range(1, tp)]
        env.append({"name": PLACEMENT_ENV, "value": json.dumps({"nodes": list(range(tp)), "hosts": hosts})})
    leader = container(options, "pdlaunch.server", ["--instance", spec.model_dump_json()], env,
                        _ports(ports, group.role, range(ranks_here), tp, leader=True), gpus, leader=True)
    template = LeaderWorkerTemplate(leader_template=pod_template(options, group.role, leader, True, secret_digest),
                                    worker_template=pod_template(options, group.role, leader, True, secret_digest),
                                    size=1, restart_policy="RecreateGroupOnPodRestart")
    if spread:
        # Worker pod r is TP rank r (LWS_WORKER_INDEX); it binds side_channel_port + r on its own address.
        # Its one GPU is index 0 in its pod, whichever rank it is (remote_rank reads devices[rank]).
        worker_spec = spec.model_copy(update={"devices": [0] * tp if cfg.device == "cuda" else []})
        placement = json.dumps({"nodes": list(range(tp)), "hosts": [f"$({LEADER_ADDRESS_ENV})"] * tp})
        worker = container(options, "pdlaunch.distributed.remote_rank",
                            ["--instance", worker_spec.model_dump_json(), "--rank", f"$({WORKER_INDEX_ENV})",
                             "--placement", placement],
                            pod_env(link_secret), _ports(ports, group.role, range(1, tp), tp, leader=False), gpus,
                            leader=False)
        template.worker_template = pod_template(options, group.role, worker, False, secret_digest)
        template.size = tp
    return LeaderWorkerSet(
        metadata=ObjectMeta(name=_lws_name(options, group.role, g), namespace=options.namespace,
                            labels={**app_labels(options), ROLE_LABEL: group.role}),
        spec=LeaderWorkerSetSpec(replicas=group.count, leader_worker_template=template,
                                 startup_policy="LeaderCreated"))


