"""`--backend ray` on a launcher machine that is not where the instances run (often a head without GPUs):
`device: auto` is the cluster's device, and a CUDA deployment is checked against the cluster's GPUs (per node,
one GPU's memory read by a one-GPU Ray task), not this machine's. A stand-in for the ray module: no cluster here
(tests/cluster/test_ray.py runs a real CPU one; no GPU cluster is reachable from CI)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from pdlaunch.config import ray_cluster
from pdlaunch.config.backend import backend_target
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.ray_check import with_ray_cluster
from pdlaunch.config.ray_cluster import bundle
from pdlaunch.config.validate import validate_deployment
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.plan import plan_deployment
from pdlaunch.memory import host_devices
from tests.config.cli_helpers import check, check_json

# how `--ray-address auto` is named while RAY_ADDRESS is unset (config/ray_init.cluster_words)
AUTO = ("the Ray cluster this machine is part of (launcher.ray_address auto: RAY_ADDRESS is not set: the one a "
        "`ray start` on this machine runs)")

GIB = 1 << 30


class StandInRay:
    """What config/ray_cluster.py asks of ray: the live nodes, what is free on them, and a one-GPU task's answer."""

    def __init__(self, resources: list[dict[str, float]], gpu_bytes: int | Exception = 80 * GIB) -> None:
        self.resources, self.gpu_bytes = resources, gpu_bytes
        self.tasks: list[dict[str, Any]] = []

    def nodes(self) -> list[dict[str, Any]]:
        return [{"NodeID": f"n{i}", "NodeManagerAddress": f"10.0.0.{i + 1}", "Resources": r, "Alive": True}
                for i, r in enumerate(self.resources)]

    def available_resources(self) -> dict[str, float]:
        """An idle cluster: everything free (check-config warns when the deployment needs more: test_ray_fit.py)."""
        return {k: sum(r.get(k, 0.0) for r in self.resources) for r in self.resources for k in r}

    def remote(self, **options: Any) -> Callable[[Callable[[], int]], SimpleNamespace]:
        self.tasks.append(options)
        return lambda fn: SimpleNamespace(remote=lambda: fn)

    def get(self, ref: object, timeout: float) -> int:
        assert ref is ray_cluster.gpu_total_bytes and timeout == ray_cluster.GPU_PROBE_TIMEOUT_S
        if isinstance(self.gpu_bytes, Exception):
            raise self.gpu_bytes
        return self.gpu_bytes


CPU_HEAD = {"CPU": 8.0}
GPU_NODE = {"CPU": 64.0, "GPU": 8.0}


def cfg(device: str = "auto") -> DeploymentConfig:
    return DeploymentConfig.model_validate({
        "device": device, "launcher": {"backend": "ray"}, "proxy": {"port": 0}, "model": {"path": "tiny"},
        "instances": [{"role": "prefill"}, {"role": "decode"}]})


def test_device_auto_is_the_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_cluster, "connect", lambda c: StandInRay([CPU_HEAD, GPU_NODE]))
    gpu = with_ray_cluster(cfg())
    assert gpu.device == "cuda" and bundle(gpu, "decode") == {"GPU": 1.0}
    monkeypatch.setattr(ray_cluster, "connect", lambda c: StandInRay([CPU_HEAD, CPU_HEAD]))
    assert with_ray_cluster(cfg()).device == "cpu"
    assert with_ray_cluster(cfg("cpu")).device == "cpu"


def test_a_cuda_deployment_is_checked_against_the_clusters_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine has no GPU; the cluster's GPU node has eight of 80 GiB: check-config passes there and says
    which host it checked, where it refused `cuda` on this machine's account before."""
    ray = StandInRay([CPU_HEAD, GPU_NODE])
    monkeypatch.setattr(ray_cluster, "connect", lambda c: ray)
    result = check(["--model", "tiny", "--backend", "ray"])
    assert result.exit_code == 0, result.output
    assert "8 GPU(s) x 80 GiB (the Ray cluster)" in result.output
    assert ray.tasks and ray.tasks[0] == {"num_gpus": 1}
    report = check_json(["--model", "tiny", "--backend", "ray", "--device", "cuda"])
    assert report["valid"], report
    target = backend_target(with_ray_cluster(cfg()))
    assert target is not None and (target.gpus, target.gpu_memory_gib) == (8, 80.0)



@pytest.mark.parametrize("visible", [None, "", "3"], ids=["no GPU", "CUDA_VISIBLE_DEVICES=", "CUDA_VISIBLE_DEVICES=3"])
def test_the_launchers_own_gpus_place_no_rank(monkeypatch: pytest.MonkeyPatch, visible: str | None) -> None:
    """The launcher plans the instances Ray places: each rank's actor gets one GPU of Ray's (Ray sets its
    CUDA_VISIBLE_DEVICES, and the rank uses its device 0). What this machine sees, no GPU or one under a
    CUDA_VISIBLE_DEVICES of its own, must neither refuse the plan (it did: "this machine has 0 GPU(s)") nor give
    an instance a CUDA_VISIBLE_DEVICES of this machine's."""
    monkeypatch.setattr(ray_cluster, "connect", lambda c: StandInRay([CPU_HEAD, GPU_NODE]))
    sees = 0 if not visible else 1
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(host_devices, "cuda_available", lambda: sees > 0)
    monkeypatch.setattr(host_devices, "device_count", lambda: sees)
    config = with_ray_cluster(DeploymentConfig.model_validate({
        "device": "cuda", "launcher": {"backend": "ray"}, "model": {"path": "tiny"},
        "instances": [{"role": "prefill"}, {"role": "decode"}, {"role": "decode", "tp": 2}]}))
    problems, resolved = validate_deployment(config, target=backend_target(config))
    assert problems == []
    resolved.proxy.port = 0  # picked free: other tests run next to this one
    plan = plan_deployment(resolved)
    assert [(i.spec.name, i.spec.tp, len(i.spec.devices)) for i in plan.instances] == \
        [("prefill-0", 1, 1), ("decode-0", 1, 1), ("decode-1", 2, 2)]
    assert all("CUDA_VISIBLE_DEVICES" not in i.env for i in plan.instances)

def test_the_clusters_gpu_memory_bounds_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster of 1 GiB GPUs: the KV cache the config asks for cannot fit there, and check-config says so."""
    monkeypatch.setattr(ray_cluster, "connect", lambda c: StandInRay([GPU_NODE], gpu_bytes=GIB // 64))
    result = check(["--model", "tiny", "--backend", "ray", "--num-gpu-blocks", "1000000"])
    assert result.exit_code == 1 and "GiB" in result.output and "Traceback" not in result.output, result.output


def test_a_gpu_the_task_cannot_reach_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_cluster, "connect", lambda c: StandInRay([GPU_NODE], gpu_bytes=TimeoutError("timed out")))
    with pytest.raises(PdlaunchError, match="could not read the memory of a GPU of the Ray cluster") as caught:
        backend_target(cfg("cuda"))
    assert caught.value.field == "launcher.ray_address" and "ray status" in (caught.value.hint or "")
    result = check(["--model", "tiny", "--backend", "ray"])
    assert result.exit_code == 1 and "could not read the memory" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_cpu_deployment_runs_no_task(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = StandInRay([CPU_HEAD])
    monkeypatch.setattr(ray_cluster, "connect", lambda c: ray)
    assert backend_target(with_ray_cluster(cfg())) is None and ray.tasks == []
    assert check(["--model", "tiny", "--backend", "ray"]).exit_code == 0


def test_a_refused_connection_names_rays_underlying_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.init's ConnectionError headline ("Failed to connect") hid why: the cause (here a login token the
    cluster refuses) is now in the message."""

    class AuthenticationError(Exception):
        pass

    class RefusingRay:
        @staticmethod
        def is_initialized() -> bool:
            return False

        @staticmethod
        def init(**kwargs: Any) -> None:
            try:
                raise AuthenticationError("handshake failed\n"
                                          "the token in ~/.ray/auth_token does not match the cluster's")
            except AuthenticationError as exc:
                raise ConnectionError("Failed to connect to Ray cluster at auto") from exc

    monkeypatch.setattr(ray_cluster, "import_ray", lambda: RefusingRay)
    with pytest.raises(PdlaunchError) as caught:
        ray_cluster.connect(cfg())
    assert "Failed to connect" in caught.value.message and "AuthenticationError: the token in ~/.ray/auth_token" in \
        caught.value.message and caught.value.field == "launcher.ray_address"


def test_a_task_error_is_named_without_terminal_colours(monkeypatch: pytest.MonkeyPatch) -> None:
    failed = RuntimeError("\x1b[36mray::gpu_total_bytes()\x1b[39m (pid=7, ip=10.0.0.1)\nAssertionError: no CUDA")
    monkeypatch.setattr(ray_cluster, "connect", lambda c: StandInRay([GPU_NODE], gpu_bytes=failed))
    with pytest.raises(PdlaunchError) as caught:
        backend_target(cfg("cuda"))
    assert "RuntimeError: ray::gpu_total_bytes() (pid=7, ip=10.0.0.1);" in caught.value.message + ";", \
        repr(caught.value.message)


def test_any_error_of_ray_init_is_one_line_naming_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only ConnectionError, RuntimeError (a version mismatch) and ValueError: a TimeoutError of Ray's GCS
    client went through as a traceback."""

    class TimingOutRay:
        @staticmethod
        def is_initialized() -> bool:
            return False

        @staticmethod
        def init(**kwargs: Any) -> None:
            raise TimeoutError("Timed out while waiting for the GCS to answer")

        @staticmethod
        def shutdown() -> None:
            """ray.init's helper thread registers nothing: never called here."""

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_cluster, "import_ray", lambda: TimingOutRay)
    with pytest.raises(PdlaunchError) as caught:
        ray_cluster.connect(cfg())
    assert caught.value.field == "launcher.ray_address"
    assert caught.value.message == f"cannot connect to {AUTO}: Timed out while waiting for the GCS to answer", \
        caught.value.message
