"""`pdlaunch render kubernetes`: the manifests of a deployment for a Kubernetes cluster with LeaderWorkerSet.

What the launcher does on one host, Kubernetes does here; the objects, in apply order:

- Secret `NAME-deployment`: the validated deployment as JSON (it carries the deployment secret, so it
  is a Secret, not a ConfigMap), the deployment secret alone for the proxy (and for the rank link of a TP
  group spread over pods, PDLAUNCH_TP_SECRET), and the API key if any.
- One LeaderWorkerSet per instance group (render/instance_groups.py): a replica per instance, its leader
  pod is TP rank 0, a TP group larger than a node one pod per rank.
- A Service per role (its instances' leader pods), then the proxy's Deployment and Service. The proxy
  names each instance by its leader's DNS name in the LeaderWorkerSet's headless service, and is given its
  engine_id but for the pod's UID (`--engine-id NAME=<kv_transfer.engine_id>-<leader pod>-*`): a pod
  recreated with a new UID is still the instance, a server answering with another base or pod is not.

With --model-volume, every pod that reads the checkpoint mounts it read-only where model.path is
(render/model_volume.py).
Ports come from the port plan, with fixed defaults where it leaves them to be picked (render/pod_ports.py).
A TP group spread over pods waits longer for its ranks than the launcher's default: a worker pod may still be pulling
a multi-GB image or waiting to be scheduled when its leader starts, and a leader that gives up makes LWS recreate the
whole group (POD_RENDEZVOUS_TIMEOUT_S, unless the config sets parallel.rendezvous_timeout_seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.engine_ids import FILLED_IN
from pdlaunch.config.port_plan import plan_instances
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.rules.chat_template import template_file
from pdlaunch.config.rules.security import MIN_SECRET_CHARS
from pdlaunch.errors import PdlaunchError
from pdlaunch.render.core_api import Deployment, Secret, Service
from pdlaunch.render.instance_groups import check_statefulset_names, leader_worker_set, pod_engine_id
from pdlaunch.render.lws import LeaderWorkerSet
from pdlaunch.render.objects import SECRET_ENV, meta, proxy_deployment, proxy_service, role_service
from pdlaunch.render.options import RenderOptions
from pdlaunch.render.pod_ports import group_ports
from pdlaunch.render.pod_resources import cpu_estimates

Manifest = Secret | LeaderWorkerSet | Service | Deployment  # in apply order
# The pods' parallel.rendezvous_timeout_seconds unless the config sets one: as long as a remote rank waits for its
# leader's store (remote_rank.STORE_WAIT_S), room for an image pull or a pod waiting for its node.
POD_RENDEZVOUS_TIMEOUT_S = 900.0


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
    check_statefulset_names(cfg, options)
    secret = deployment_secret(cfg)
    cfg = _with_engine_id_base(cfg, secret, options)
    pod_cfg = _pod_config(cfg, secret)
    planned = plan_instances(cfg, [], strict=False)
    secret_object = _secret(cfg, pod_cfg, secret, options)
    digest = hashlib.sha256(json.dumps(secret_object["stringData"], sort_keys=True).encode()).hexdigest()[:16]
    manifests: list[Manifest] = [secret_object]
    urls: list[tuple[str, str, str]] = []  # (role, instance name, URL) for the proxy
    engine_ids: dict[str, str] = {}  # instance name -> the engine_id the proxy expects of it
    groups = [(g, group) for g, group in enumerate(cfg.instances) if group.count > 0]
    estimates = cpu_estimates(cfg)
    for g, group in groups:
        ports = group_ports(cfg, g, [p for p in planned if p.group == g])
        lws = leader_worker_set(cfg, g, group, ports, options, digest, estimates)
        manifests.append(lws)
        lws_name = lws.metadata.name
        for k in range(group.count):  # LWS names leader k `<lws>-<k>` in the headless service `<lws>`
            name = f"{group.role}-{g}-{k}"
            urls.append((group.role, name, f"http://{lws_name}-{k}.{lws_name}:{ports.http}"))
            # whichever pod UID it gets
            engine_ids[name] = pod_engine_id(cfg.kv_transfer.engine_id, f"{lws_name}-{k}", FILLED_IN)
    for role in dict.fromkeys(group.role for _, group in groups):
        http_ports = [group_ports(cfg, g, [p for p in planned if p.group == g]).http
                      for g, group in groups if group.role == role]
        manifests.append(role_service(role, http_ports, options))
    # The proxy pod tokenizes chat prompts as the instances do: with the template text they were given.
    template = pod_cfg.model.chat_template
    proxy_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"chat_template": template})})
    manifests += [proxy_deployment(proxy_cfg, urls, engine_ids, options, digest), proxy_service(cfg, options)]
    return manifests


def storage_connector_problems(cfg: DeploymentConfig) -> list[Problem]:
    """PD over the storage connector: prefill pods would write KV files to their own filesystem and decode pods look
    in theirs (the manifests mount no shared volume), so every prompt would be computed twice."""
    if cfg.colocated or cfg.kv_transfer.connector != "storage":
        return []
    return [problem("kv_transfer.connector", "'storage' passes KV through files in kv_transfer.storage_path, and "
                    "every pod has its own filesystem: decode pods would never find what prefill pods stored and "
                    "would compute every prompt again", "use connector 'nixl' (or 'mooncake') in Kubernetes")]


def _with_engine_id_base(cfg: DeploymentConfig, secret: str, options: RenderOptions) -> DeploymentConfig:
    """`cfg` with its engine_id base, when it names none, drawn from the deployment secret, the namespace and
    --name: a re-render with the same secret keeps the base, so the running proxy accepts the new pods during the
    rollout (they take its signed params); a new secret, or another deployment, gets another base, so an old proxy
    (whose params the new pods would refuse) does not take them. A hash: /health shows the base, never the secret."""
    if "engine_id" in cfg.kv_transfer.model_fields_set:
        return cfg
    seed = "\0".join(("pdlaunch engine_id base", secret, options.namespace or "", options.name))
    out = cfg.model_copy(deep=True)
    out.kv_transfer.engine_id = hashlib.sha256(seed.encode()).hexdigest()[:32]
    return out


def _pod_config(cfg: DeploymentConfig, secret: str) -> DeploymentConfig:
    """The config every pod reads: Kubernetes places the pods, so no node list; the side channel binds
    every interface and each rank advertises its pod's address; TP ranks in the leader pod reach its
    rendezvous store on loopback (ranks in worker pods are given the leader's address), waiting
    POD_RENDEZVOUS_TIMEOUT_S for one another unless the config says; a chat template file of this machine is carried
    as its text (a path that is no file here, one in the image, stays a path)."""
    out = cfg.model_copy(deep=True)
    out.parallel.nodes = []
    out.parallel.node_rank = 0
    out.parallel.master_addr = "127.0.0.1"
    if "rendezvous_timeout_seconds" not in cfg.parallel.model_fields_set:
        out.parallel.rendezvous_timeout_seconds = POD_RENDEZVOUS_TIMEOUT_S
    out.kv_transfer.side_channel_host = "0.0.0.0"
    out.security.deployment_secret = secret
    local = template_file(out.model.chat_template)
    if local is not None:  # a pod has none of this machine's files: it gets the template's text
        out.model.chat_template = local.read_text(encoding="utf-8")
    return out


def _secret(cfg: DeploymentConfig, pod_cfg: DeploymentConfig, secret: str, options: RenderOptions) -> Secret:
    data = {"deployment.json": pod_cfg.model_dump_json(indent=2), "deployment-secret": secret}
    if cfg.security.api_key:
        data["api-key"] = cfg.security.api_key
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta(f"{options.name}-deployment", options),
            "type": "Opaque", "stringData": data}
