"""check-config's summary under `--backend ray` says the instances run on the Ray cluster (its live nodes and
CPUs, or the GPUs per node a CUDA config was checked against), not "this machine (cpu)": the launcher's machine
runs the proxy only. A stand-in for the ray module (test_ray_cluster_device.py's)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from pdlaunch.config import ray_cluster
from pdlaunch.errors import PdlaunchError
from tests.cluster.test_ray_cluster_device import CPU_HEAD, GPU_NODE, StandInRay, cfg
from tests.config.cli_helpers import check


class ConnectedRay(StandInRay):
    """Connected to the cluster whose GCS is at 10.0.0.1:6379 (what `auto` found)."""

    def is_initialized(self) -> bool:
        return True

    def get_runtime_context(self) -> SimpleNamespace:
        return SimpleNamespace(gcs_address="10.0.0.1:6379")


def test_a_cpu_deployment_names_the_clusters_nodes_not_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--ray-address auto` (the default) is said as what it means, with the address it found: before, "the Ray
    cluster at auto"."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_cluster, "connect", lambda c: ConnectedRay([CPU_HEAD, CPU_HEAD]))
    result = check(["--model", "tiny", "--backend", "ray"])  # device auto: the cluster's, cpu
    assert result.exit_code == 0, result.output
    assert ("on the Ray cluster this machine is part of (launcher.ray_address auto: RAY_ADDRESS is not set: the one "
            "a `ray start` on this machine runs), at 10.0.0.1:6379 (cpu; 2 live node(s), 16 CPU(s) in all; Ray "
            "places each instance on them)" in " ".join(result.output.split())), result.output
    assert "at auto" not in result.output and "this machine (cpu" not in result.output, result.output


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
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert ray_host_line(cfg("cpu"), None) == ("the Ray cluster this machine is part of (launcher.ray_address auto: "
                                               "RAY_ADDRESS=10.0.0.7:6379) (cpu; Ray places each instance on its "
                                               "nodes)")


def test_auto_typed_as_the_flag_is_named_as_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--ray-address auto` typed: the host line said `launcher.ray_address auto`, a key the user never wrote (the
    connect's errors and serve's lines say --ray-address)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_cluster, "connect", lambda c: ConnectedRay([CPU_HEAD, CPU_HEAD]))
    result = check(["--model", "tiny", "--backend", "ray", "--ray-address", "auto"])
    assert result.exit_code == 0, result.output
    assert ("on the Ray cluster this machine is part of (--ray-address auto: RAY_ADDRESS is not set: the one a `ray "
            "start` on this machine runs), at 10.0.0.1:6379 (cpu;" in " ".join(result.output.split())), result.output
    assert "launcher.ray_address" not in result.output, result.output


def test_auto_from_the_file_is_named_by_its_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_cluster, "connect", lambda c: ConnectedRay([CPU_HEAD, CPU_HEAD]))
    config = tmp_path / "pd.yaml"
    config.write_text("launcher: {backend: ray, ray_address: auto}\nmodel: {path: tiny}\n")
    result = check([str(config)])
    assert result.exit_code == 0, result.output
    assert "(launcher.ray_address auto: RAY_ADDRESS is not set" in " ".join(result.output.split()), result.output
    assert "--ray-address" not in result.output, result.output
