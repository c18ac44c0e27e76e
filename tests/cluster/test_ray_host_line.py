"""check-config's summary under `--backend ray` says the instances run on the Ray cluster (its live nodes and
CPUs, or the GPUs per node a CUDA config was checked against), not "this machine (cpu)": the launcher's machine
runs the proxy only. A stand-in for the ray module (test_ray_cluster_device.py's)."""

from __future__ import annotations

import pytest

from pdlaunch.config import ray_cluster
from pdlaunch.errors import PdlaunchError
from tests.cluster.test_ray_cluster_device import CPU_HEAD, GPU_NODE, StandInRay, cfg
from tests.config.cli_helpers import check


def test_a_cpu_deployment_names_the_clusters_nodes_not_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_cluster, "connect", lambda c: StandInRay([CPU_HEAD, CPU_HEAD]))
    result = check(["--model", "tiny", "--backend", "ray"])  # device auto: the cluster's, cpu
    assert result.exit_code == 0, result.output
    assert ("on the Ray cluster at auto (cpu; 2 live node(s), 16 CPU(s) in all; Ray places each instance on them)"
            in " ".join(result.output.split())), result.output
    assert "this machine" not in result.output, result.output


def test_a_cuda_deployment_names_the_gpus_per_node_it_was_checked_against(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_cluster, "connect", lambda c: StandInRay([CPU_HEAD, GPU_NODE]))
    result = check(["--model", "tiny", "--backend", "ray", "--ray-address", "10.0.0.1:6379"])
    assert result.exit_code == 0, result.output
    assert ("on the Ray cluster at 10.0.0.1:6379, checked per node as 8 GPU(s) x 80 GiB (the Ray cluster); Ray "
            "places each instance" in " ".join(result.output.split())), result.output
    assert "this machine" not in result.output, result.output


def test_a_cluster_that_cannot_be_asked_again_is_named_by_its_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from pdlaunch.config.ray_check import ray_host_line

    def gone(c: object) -> None:
        raise PdlaunchError("cannot connect to the Ray cluster at auto", field="launcher.backend")

    monkeypatch.setattr(ray_cluster, "connect", gone)
    assert ray_host_line(cfg("cpu"), None) == "the Ray cluster at auto (cpu; Ray places each instance on its nodes)"
