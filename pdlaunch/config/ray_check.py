"""`cfg` checked against the Ray cluster it names, before anything starts (check-config and serve): the fields of
the local launcher refused, the cluster connected, `device: auto` made the cluster's, then what the cluster lacks:
the resources named and room for each instance alone (config/ray_cluster.py), then room for every instance at once
(config/ray_fit.py)."""

from __future__ import annotations

import sys

from pdlaunch.config import ray_cluster
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.ray_fit import refuse_unfit
from pdlaunch.config.ray_init import cluster_words
from pdlaunch.config.target_host import TargetHost
from pdlaunch.errors import PdlaunchError


def with_ray_cluster(cfg: DeploymentConfig) -> DeploymentConfig:
    """`cfg` checked against the Ray cluster it names (connecting to it), its `device: auto` made the
    cluster's. Raises PdlaunchError."""
    ray_cluster.check_local_fields(cfg)
    ray = ray_cluster.connect(cfg)
    nodes = ray_cluster.live_nodes(ray)
    cfg = ray_cluster.with_cluster_device(cfg, nodes)
    problems = ray_cluster.check_cluster(cfg, nodes)
    if problems:
        field_name, message = problems[0]
        more = "; ".join(f"{f}: {m}" for f, m in problems[1:])
        raise PdlaunchError(message + (f"; also {more}" if more else ""), field=field_name,
                            hint="start nodes with those resources (`ray start --resources '{\"NAME\": 1}'`) "
                            "or change launcher.ray_resources / the TP sizes")
    refuse_unfit(cfg, nodes)  # each instance fits the idle cluster alone: all of them together?
    return cfg


def ray_host_line(cfg: DeploymentConfig, target: TargetHost | None) -> str:
    """Where check-config's summary says the instances of a `--backend ray` config run: the Ray cluster, not this
    machine (it runs the launcher and the proxy only). For a CUDA config, the GPU host it was checked against
    (config/backend.backend_target); else the cluster's live nodes and CPUs as they are now (Ray places each
    instance on them), or only its address where it cannot be asked again."""
    address = cfg.launcher.ray_address
    if target is not None:  # checked against the cluster already, where it was asked: named as connected then
        return (f"{cluster_words(address, sys.modules.get('ray'))}, checked per node as {target.gpus} GPU(s) x "
                f"{target.gpu_memory_gib:g} GiB ({target.source}); Ray places each instance")
    try:
        ray = ray_cluster.connect(cfg)
        nodes = ray_cluster.live_nodes(ray)
    except PdlaunchError:
        return f"{cluster_words(address)} ({cfg.device}; Ray places each instance on its nodes)"
    cpus = sum(node.resources.get("CPU", 0.0) for node in nodes)
    return (f"{cluster_words(address, ray)} ({cfg.device}; {len(nodes)} live node(s), {cpus:g} CPU(s) in all; Ray "
            "places each instance on them)")
