"""One LeaderWorkerSet per instance group in `pdlaunch render kubernetes` (the LWS model: render/lws.py).

A replica per instance, its leader pod is TP rank 0 (the instance's HTTP server and engine). A TP group
that fits one node (tp <= --gpus-per-node) is one pod holding all its GPUs; a larger one is one pod per
rank, the workers being `pdlaunch.distributed.remote_rank` processes that rendezvous at `LWS_LEADER_ADDRESS`.
The LWS controller makes a StatefulSet of each group's workers named after its leader pod (`<lws>-<k>`):
--name is refused when one would pass the 52 characters a StatefulSet's pods can be labelled with.
Each pod advertises its own `status.podIP` (downward API) for HTTP and the KV side channel. An instance is named
after its leader pod (`<lws>-<k>`, InstanceSpec.pod) in all its pods: in its /info and log lines, and in the key of
its TP rank link, which its worker pods must derive alike (they read the leader's name from the pod annotation LWS
gives them).
"""

from __future__ import annotations

import json

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.rules.memory import GroupMemory
from pdlaunch.config.topology_config import InstanceGroupConfig, group_expert_parallel, group_kv_cache_dtype
from pdlaunch.errors import PdlaunchError
from pdlaunch.render.core_api import ContainerPort, EnvVar
from pdlaunch.render.liveness import add_liveness
from pdlaunch.render.lws import (
    LEADER_ADDRESS_ENV,
    LEADER_NAME_ANNOTATION,
    WORKER_INDEX_ENV,
    LeaderWorkerSet,
    LeaderWorkerSetSpec,
    LeaderWorkerTemplate,
    ObjectMeta,
)
from pdlaunch.render.objects import (
    PLACEMENT_ENV,
    ROLE_LABEL,
    TP_SECRET_ENV,
    app_labels,
    container,
    literal,
    pod_env,
    pod_template,
    secret_env,
)
from pdlaunch.render.options import RenderOptions
from pdlaunch.render.pod_ports import GroupPorts
from pdlaunch.render.pod_resources import engine_resources, engine_threads

# Where a worker pod's container finds its leader pod's name (from LEADER_NAME_ANNOTATION).
LEADER_NAME_ENV = "PDLAUNCH_LEADER_POD"
# The StatefulSet controller labels each pod `controller-revision-hash: <StatefulSet>-<10-character hash>`, at most
# 63 characters: a longer StatefulSet gets no pod at all (kubernetes/kubernetes#64023).
STATEFULSET_NAME_MAX = 52


def _lws_name(options: RenderOptions, role: str, g: int) -> str:
    return f"{options.name}-{role}-{g}"


def _spread(cfg: DeploymentConfig, group: InstanceGroupConfig, options: RenderOptions) -> bool:
    """One pod per TP rank: the group's TP does not fit one node."""
    return cfg.device == "cuda" and (group.tp or 1) > options.gpus_per_node


def check_statefulset_names(cfg: DeploymentConfig, options: RenderOptions) -> None:
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


def pod_engine_id(base: str, pod_name: str, pod_uid: str) -> str:
    """The engine_id of the instance whose leader pod is `pod_name` (`base`: kv_transfer.engine_id): a recreated pod
    keeps its name but has a new UID, hence a new engine_id (as a restart by the local launcher): peers must not
    reuse what they cached for the dead one. The pods get it with $(POD_NAME) and $(POD_UID) (and the base as a
    literal), the proxy with the name and `*` for the UID."""
    return f"{base}-{pod_name}-{pod_uid}"


def _instance_spec(cfg: DeploymentConfig, group: InstanceGroupConfig, ports: GroupPorts, ranks_here: int
                   ) -> InstanceSpec:
    """The instance as its leader pod sees it: one spec for every replica of the group, so it carries no number of
    its own (index 0); its pod's name (the kubelet expands $(POD_NAME)), as its name and in its engine_id, tells the
    replicas apart, as `<role>-<group>-<k>` does in the proxy."""
    tp = group.tp or 1
    return InstanceSpec(
        role=group.role, index=0, host="$(POD_IP)", port=ports.http, tp=tp,
        expert_parallel=group_expert_parallel(cfg.parallel, group),
        kv_cache_dtype=group_kv_cache_dtype(cfg.cache, group),
        devices=list(range(ranks_here)) if cfg.device == "cuda" else [],
        device="cuda" if cfg.device == "cuda" else "cpu",
        engine_id=pod_engine_id(literal(cfg.kv_transfer.engine_id), "$(POD_NAME)", "$(POD_UID)"),
        side_channel_port=ports.side_channel,  # None where the group opens none (colocated, storage)
        master_port=ports.master if tp > 1 else None)


def _instance_arg(spec: InstanceSpec, pod: str) -> str:
    """The `--instance` JSON of a pod: `spec` named after `pod`, a $(VAR) the kubelet expands to a pod's name (so
    the spec is checked only in the pod, by instance_spec_from_json)."""
    return json.dumps(spec.model_dump(mode="json") | {"pod": pod}, separators=(",", ":"))


def _ports(ports: GroupPorts, side_ranks: range, tp: int, leader: bool) -> list[ContainerPort]:
    found: list[ContainerPort] = []
    if leader:
        found.append({"name": "http", "containerPort": ports.http, "protocol": "TCP"})
    if ports.side_channel is not None:
        found += [{"name": f"kv-side-{r}", "containerPort": ports.side_channel + r, "protocol": "TCP"}
                  for r in side_ranks]
    if leader and tp > 1:
        found.append({"name": "rendezvous", "containerPort": ports.master, "protocol": "TCP"})
    return found


def leader_worker_set(cfg: DeploymentConfig, g: int, group: InstanceGroupConfig, ports: GroupPorts,
                      options: RenderOptions, secret_digest: str, estimates: list[GroupMemory] | None
                      ) -> LeaderWorkerSet:
    """`estimates`: the CPU pods' memory estimate per group (pod_resources.cpu_estimates)."""
    tp = group.tp or 1
    spread = _spread(cfg, group, options)
    ranks_here = 1 if spread else tp
    resources = engine_resources(cfg, g, ranks_here, estimates,  # a pod per rank when spread: one rank's each
                                 options.cpu_pod_memory, options.cpu_pod_memory_limit)
    spec = _instance_spec(cfg, group, ports, ranks_here)
    # The ranks in other pods join rank 0 over the cluster network: without a secret in their link's key, anyone
    # who can read the config's model path and ports could join in their place.
    link_secret = [secret_env(TP_SECRET_ENV, "deployment-secret", options)] if spread else []
    env = pod_env([*engine_threads(cfg), *link_secret])
    if spread:  # ranks 1..tp-1 are the worker pods `<leader pod>-<r>`; rank 0 listens on its pod's address
        hosts = ["$(POD_IP)"] + [f"$(POD_NAME)-{r}" for r in range(1, tp)]
        env.append({"name": PLACEMENT_ENV, "value": json.dumps({"nodes": list(range(tp)), "hosts": hosts})})
    leader = container(options, "pdlaunch.server", ["--instance", _instance_arg(spec, "$(POD_NAME)")], env,
                        _ports(ports, range(ranks_here), tp, leader=True), resources, leader=True)
    add_liveness(leader, cfg, ports.http)  # supervision.stall_restart_seconds (render/liveness.py)
    template = LeaderWorkerTemplate(leader_template=pod_template(options, group.role, leader, True, secret_digest),
                                    worker_template=pod_template(options, group.role, leader, True, secret_digest),
                                    size=1, restart_policy="RecreateGroupOnPodRestart")
    if spread:
        # Worker pod r is TP rank r (LWS_WORKER_INDEX); it binds side_channel_port + r on its own address.
        # Its one GPU is index 0 in its pod, whichever rank it is (remote_rank reads devices[rank]). It takes the
        # instance's name, its leader pod's: the rank link's key mixes the name in (distributed/placement.py).
        worker_spec = spec.model_copy(update={"devices": [0] * tp if cfg.device == "cuda" else []})
        leader_name: EnvVar = {"name": LEADER_NAME_ENV, "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{LEADER_NAME_ANNOTATION}']"}}}
        placement = json.dumps({"nodes": list(range(tp)), "hosts": [f"$({LEADER_ADDRESS_ENV})"] * tp})
        worker = container(options, "pdlaunch.distributed.remote_rank",
                            ["--instance", _instance_arg(worker_spec, f"$({LEADER_NAME_ENV})"),
                             "--rank", f"$({WORKER_INDEX_ENV})", "--placement", placement],
                            pod_env([*link_secret, leader_name]),
                            _ports(ports, range(1, tp), tp, leader=False), resources, leader=False)
        template.worker_template = pod_template(options, group.role, worker, False, secret_digest)
        template.size = tp
    return LeaderWorkerSet(
        metadata=ObjectMeta(name=_lws_name(options, group.role, g), namespace=options.namespace,
                            labels={**app_labels(options), ROLE_LABEL: group.role}),
        spec=LeaderWorkerSetSpec(replicas=group.count, leader_worker_template=template,
                                 startup_policy="LeaderCreated"))

