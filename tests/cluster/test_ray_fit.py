"""`--backend ray`: check-config adds the whole deployment's placement groups up against the cluster
(config/ray_fit.py), where each instance alone fitting an idle cluster passed before and `serve` then waited out
launcher.ray_placement_timeout_seconds. A stand-in for the ray module: no cluster here (tests/cluster/test_ray.py
runs a real one through the CLI)."""

from __future__ import annotations

import io
import types
from pathlib import Path

import pytest
from rich.console import Console

from pdlaunch.config import ray_cluster
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.ray_cluster import RayNode, check_cluster
from pdlaunch.config.ray_fit import deployment_placements, fit_problems
from tests.config.cli_helpers import check, check_json

A = RayNode("a", "10.0.0.1", {"CPU": 2.0, "pd_prefill": 1.0})
B = RayNode("b", "10.0.0.2", {"CPU": 2.0, "pd_decode": 1.0})
C = RayNode("c", "10.0.0.3", {"CPU": 2.0, "pd_decode": 1.0})


def cfg(instances: list[dict[str, object]], device: str = "cpu", **launcher: object) -> DeploymentConfig:
    return DeploymentConfig.model_validate({
        "device": device, "launcher": {"backend": "ray", **launcher}, "proxy": {"port": 0}, "model": {"path": "tiny"},
        "instances": instances})


EIGHT_CPUS = [{"role": "prefill", "count": 4, "tp": 1}, {"role": "decode", "count": 2, "tp": 2}]


def test_a_deployment_larger_than_the_cluster_is_a_problem_though_each_instance_fits() -> None:
    """8 one-CPU bundles (4 prefills of TP 1, 2 decodes of TP 2) on three nodes of 2 CPUs: each instance alone
    fits an idle cluster, the deployment never does."""
    big = cfg(EIGHT_CPUS)
    assert check_cluster(big, [A, B, C]) == []  # each instance alone
    problems = fit_problems(big, [A, B, C])
    assert [f for f, _ in problems] == ["instances"], problems
    said = problems[0][1]
    assert "need {CPU: 8} in all" in said and "the cluster has {CPU: 6} in all" in said, said
    assert "prefill: 4 instance(s) of 1 bundle(s) of {CPU: 1}" in said, said
    assert "decode: 2 instance(s) of 2 bundle(s) of {CPU: 1}" in said, said
    assert fit_problems(cfg([{"role": "prefill", "count": 2, "tp": 1}, {"role": "decode", "count": 2, "tp": 2}]),
                        [A, B, C]) == []  # 6 of 6: fits


def test_more_gpus_than_the_cluster_has() -> None:
    gpu = [RayNode("h", "10.0.0.1", {"CPU": 8.0}), RayNode("g1", "10.0.0.2", {"CPU": 64.0, "GPU": 4.0}),
           RayNode("g2", "10.0.0.3", {"CPU": 64.0, "GPU": 4.0})]
    three = cfg([{"role": "prefill", "count": 1, "tp": 4}, {"role": "decode", "count": 2, "tp": 4}], device="cuda")
    assert check_cluster(three, gpu) == []
    problems = fit_problems(three, gpu)
    assert len(problems) == 1 and "need {GPU: 12} in all" in problems[0][1], problems
    assert "the cluster has {GPU: 8} in all" in problems[0][1], problems


def test_a_role_pinned_to_one_node_fits_that_node_only() -> None:
    """The README's pinning (a fraction of a custom resource per rank) lands every prefill on the node with
    pd_prefill: three one-CPU prefills do not fit its 2 CPUs, whatever the other nodes have free."""
    pinned = cfg([{"role": "prefill", "count": 3, "tp": 1}, {"role": "decode", "count": 1, "tp": 1}],
                 ray_resources={"prefill": {"pd_prefill": 0.01}, "decode": {"pd_decode": 0.01}})
    assert check_cluster(pinned, [A, B, C]) == []
    problems = fit_problems(pinned, [A, B, C])
    assert len(problems) == 1, problems
    said = problems[0][1]
    assert "its prefill instances need {CPU: 3} in all" in said, said
    assert "the live node(s) that can hold their bundles (10.0.0.1) have {CPU: 2} in all" in said, said


def test_roles_pinned_to_the_same_node_are_added_up_together() -> None:
    """Prefills pinned by one resource and decodes by another, both found only on node a: each role alone fits it,
    together they do not."""
    both = RayNode("a", "10.0.0.1", {"CPU": 2.0, "pd_prefill": 1.0, "pd_decode": 1.0})
    other = RayNode("z", "10.0.0.2", {"CPU": 2.0, "pd_other": 1.0})
    pinned = cfg([{"role": "prefill", "count": 2, "tp": 1}, {"role": "decode", "count": 1, "tp": 1}],
                 ray_resources={"prefill": {"pd_prefill": 0.01}, "decode": {"pd_decode": 0.01}})
    problems = fit_problems(pinned, [both, other])
    assert len(problems) == 1 and "the deployment's instances need {CPU: 3} in all" in problems[0][1], problems
    assert "(10.0.0.1) have {CPU: 2}" in problems[0][1], problems


def test_bundles_are_not_split_across_nodes() -> None:
    """Half a CPU left on each of three nodes adds up to 1.5 CPUs, but holds no one-CPU bundle: the bundles
    a role's instances ask for are counted node by node."""
    halves = [RayNode(f"n{i}", f"10.0.0.{i}", {"CPU": 1.5}) for i in range(1, 4)]
    four = cfg([{"role": "prefill", "count": 4, "tp": 1}])
    assert fit_problems(cfg([{"role": "prefill", "count": 3, "tp": 1}]), halves) == []
    problems = fit_problems(four, halves)
    assert len(problems) == 1, problems
    assert "the live nodes hold 3 bundle(s) of {CPU: 1} in all" in problems[0][1], problems
    assert "the prefill instances need 4" in problems[0][1], problems


def test_the_plan_is_the_one_the_ray_backend_places(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The placement groups added up are the ones `serve` asks Ray for, one per instance, a bundle per TP rank."""
    from pdlaunch.launcher.backends import ray_deployment as backend

    placements = deployment_placements(cfg(EIGHT_CPUS), [A, B, C])
    assert [g for g, _ in placements] == [0, 0, 0, 0, 1, 1]
    assert [(len(p.bundles), p.strategy, p.role) for _, p in placements][-1] == (2, "PACK", "decode")
    monkeypatch.setattr(backend, "connect", lambda c: types.ModuleType("ray"))
    monkeypatch.setattr(backend, "live_nodes", lambda ray: [A, B, C])
    deployment = backend.RayDeployment(cfg(EIGHT_CPUS).model_copy(update={"log_dir": str(tmp_path)}),
                                       Console(file=io.StringIO()))
    try:
        assert [(run.group, run.placement) for run in deployment.runs] == placements
        assert [len(run.placement.bundles) for run in deployment.runs] == [r.plan.spec.tp for r in deployment.runs]
    finally:
        deployment.stalls.stop()
        deployment._http.close()
        deployment.reservations.release()


class StandInRay:
    """What check-config asks of ray: the live nodes and what is free on them now."""

    def __init__(self, nodes: list[RayNode], free: dict[str, float]) -> None:
        self.node_list, self.free = nodes, free

    def nodes(self) -> list[dict[str, object]]:
        return [{"NodeID": n.node_id, "NodeManagerAddress": n.address, "Resources": n.resources, "Alive": True}
                for n in self.node_list]

    def available_resources(self) -> dict[str, float]:
        return self.free


def test_check_config_refuses_a_deployment_the_cluster_can_never_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_cluster, "connect", lambda c: StandInRay([A, B, C], {"CPU": 6.0}))
    args = ["--model", "tiny", "--device", "cpu", "--backend", "ray", "--prefill", "4", "--decode", "2",
            "--decode-tp", "2"]
    result = check(args)
    assert result.exit_code == 1, result.output
    assert "instances: the deployment's instances need {CPU: 8} in all" in result.output, result.output
    assert "can never be placed" in result.output and "add nodes" in result.output, result.output
    assert "Traceback" not in result.output


def test_check_config_warns_when_less_is_free_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """6 CPUs in all, 2 free (others' jobs hold the rest): valid, with a warning that serve may wait out
    launcher.ray_placement_timeout_seconds."""
    monkeypatch.setattr(ray_cluster, "connect", lambda c: StandInRay([A, B, C], {"CPU": 2.0, "memory": 1e9}))
    args = ["--model", "tiny", "--device", "cpu", "--backend", "ray", "--prefill", "2", "--decode", "2"]
    report = check_json(args)
    assert report["valid"], report
    warned = [w["message"] for w in report["warnings"] if w["field"] == "instances"]
    assert len(warned) == 1, report["warnings"]
    assert "need {CPU: 4} in all" in warned[0] and "{CPU: 2} free now, of {CPU: 6} in all" in warned[0], warned
    assert "launcher.ray_placement_timeout_seconds (120s)" in warned[0] and "ray status" in warned[0], warned
    monkeypatch.setattr(ray_cluster, "connect", lambda c: StandInRay([A, B, C], {"CPU": 4.0}))
    assert not [w for w in check_json(args)["warnings"] if w["field"] == "instances"]
