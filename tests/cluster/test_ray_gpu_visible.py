"""`--backend ray` on a cluster started with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 (a raylet's environment,
or a job's runtime_env): Ray then leaves CUDA_VISIBLE_DEVICES of an actor as its worker inherited it, and every rank
actor, which runs on device 0 of what it sees (launcher/backends/ray_actors.py gives each rank devices [0]), saw all
the node's GPUs and ran on its GPU 0: every rank and instance of the node on one GPU. Each rank actor now sees the
one GPU of its bundle, as on any other cluster.

A real head on this machine that tells Ray it has two GPUs (`ray start --num-gpus 2`: Ray hands out GPU ids without
asking CUDA), and RayActors.launch with stand-ins for the rank actors that report what they see: no GPU needed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.ray_cluster import RayCluster, RayHead, RayUnavailable
from tests.cluster.running import running

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

NOSET = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
GPUS = 2

# A driver on the head (its job's runtime_env env_vars: JOB_ENV): a TP-2 instance on CUDA placed and launched as the
# launcher does, its actors stand-ins that answer what CUDA_VISIBLE_DEVICES they run under and which GPU ids Ray gave
# them.
LAUNCH = f"""
import os
if JOB_ENV:
    address = ray.get_runtime_context().gcs_address
    ray.shutdown()
    ray.init(address=address, runtime_env={{"env_vars": JOB_ENV}}, log_to_driver=False, logging_level="ERROR")
from pathlib import Path

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.ray_cluster import live_nodes, plan_instance
from pdlaunch.distributed import ray_rank
from pdlaunch.launcher.backends import ray_instance
from pdlaunch.launcher.backends.ray_actors import RayActors
from pdlaunch.launcher.backends.ray_run import RayRun
from pdlaunch.launcher.plan import plan_deployment
from pdlaunch.launcher.restart_policy import ProcessRecord


class Sees:
    def sees(self):
        return os.environ.get("CUDA_VISIBLE_DEVICES"), sorted(str(i) for i in ray.get_gpu_ids())


class Rank(Sees):
    def __init__(self, rank, config_json, spec_json, log_path, env):
        pass


class Instance(Sees):
    def __init__(self, name, log_path, env):
        pass

    def serve(self, config_json, spec_json, ranks):
        return 0


ray_rank.RayRank, ray_instance.RayInstance = Rank, Instance
cfg = DeploymentConfig.model_validate({{"device": "cuda", "launcher": {{"backend": "ray"}}, "proxy": {{"port": 0}},
                                       "instances": [{{"role": "colocated", "tp": {GPUS}}}]}})
plan = plan_deployment(cfg).instances[0]
placement = plan_instance(cfg, "colocated", {GPUS}, live_nodes(ray))
run = RayRun(plan, 0, ProcessRecord(plan.spec.name, "colocated", "instances[0].restart", True), placement,
             Path("/tmp/unused.log"))
actors = RayActors(ray, cfg, Path("/tmp"), lambda text: None)
actors.place(run)
ray.get(run.pg_ready, timeout=60)
assert actors.launch(run, "")
out = {{"devices": run.spec.devices, "sees": [ray.get(actor.sees.remote(), timeout=60) for actor in run.actors]}}
actors.remove(run)
"""


# Where NOSET is set: the raylet's environment, the job's runtime_env -> the GPU ids Ray hands out: the node's GPUs
# 0..GPUS-1, or the entries of a CUDA_VISIBLE_DEVICES the raylet was started under (a node shared with other work),
# which the actors must then be given.
RAYLETS = {
    "NOSET": ({NOSET: "1"}, {}, ["0", "1"]),
    "NOSET under CUDA_VISIBLE_DEVICES=5,7": ({NOSET: "1", "CUDA_VISIBLE_DEVICES": "5,7"}, {}, ["5", "7"]),
    "NOSET in the job's runtime_env": ({}, {NOSET: "1"}, ["0", "1"]),
    "Ray's default": ({}, {}, ["0", "1"]),
}


class GpuHead(RayHead):
    """A head with GPUS GPUs (Ray's count only) whose raylet, and so every worker, runs with `env` added."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__("--num-gpus", str(GPUS))
        self.env.pop(NOSET, None)
        self.env.update(env)


@pytest.fixture(scope="module", params=list(RAYLETS))
def head(request: pytest.FixtureRequest) -> Iterator[tuple[RayCluster, dict[str, str], list[str]]]:
    raylet_env, job_env, ids = RAYLETS[request.param]
    for cluster in running(GpuHead(raylet_env), RayUnavailable, "a Ray head"):
        yield cluster, job_env, ids


@pytest.mark.timeout(300)
def test_each_rank_actor_sees_the_one_gpu_of_its_bundle(head: tuple[RayCluster, dict[str, str], list[str]]) -> None:
    cluster, job_env, ids_of_the_node = head
    out = cluster.query(f"JOB_ENV = {job_env!r}\n{LAUNCH}")
    assert isinstance(out, dict)
    assert out["devices"] == [0] * GPUS  # each rank runs on device 0 of what it sees
    sees = out["sees"]
    assert all(len(ids) == 1 for _, ids in sees), sees  # one GPU per bundle
    assert sorted(ids[0] for _, ids in sees) == ids_of_the_node, sees  # a GPU each
    assert all(visible == ids[0] for visible, ids in sees), \
        f"a rank actor does not see just the GPU Ray gave it (CUDA_VISIBLE_DEVICES, Ray's GPU ids): {sees}"
