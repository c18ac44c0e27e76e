"""`--backend ray` before anything starts (config/ray_cluster.py): the config fields, the placement plan
of an instance (bundles, PACK or SPREAD), what a cluster lacks, and the errors check-config gives without
ray or without a cluster. Fast: no cluster here (tests/cluster/test_ray.py runs a real one)."""

from __future__ import annotations

import io
import socket
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.ray_cluster import (
    RayNode,
    bundle,
    check_cluster,
    check_local_fields,
    gcs_probe,
    import_ray,
    plan_instance,
    unplaceable,
)
from pdlaunch.errors import PdlaunchError
from tests.config.cli_helpers import check
from tests.serving.helpers import wait_for

HEAD = RayNode("h", "10.0.0.1", {"CPU": 2.0, "pd_prefill": 1.0})
WORKER = RayNode("w1", "10.0.0.2", {"CPU": 2.0, "pd_decode": 1.0})
WORKER2 = RayNode("w2", "10.0.0.3", {"CPU": 2.0, "pd_decode": 1.0})


def ray_cfg(**launcher: object) -> DeploymentConfig:
    return DeploymentConfig.model_validate({
        "device": "cpu", "launcher": {"backend": "ray", **launcher}, "proxy": {"port": 0},
        "instances": [{"role": "prefill", "tp": 1}, {"role": "decode", "tp": 2}]})


def test_one_bundle_per_rank_with_the_roles_resources() -> None:
    cfg = ray_cfg(ray_resources={"decode": {"pd_decode": 0.01}})
    assert bundle(cfg, "prefill") == {"CPU": 1.0}
    assert bundle(cfg, "decode") == {"CPU": 1.0, "pd_decode": 0.01}
    gpu = cfg.model_copy(update={"device": "cuda"})
    assert bundle(gpu, "decode") == {"GPU": 1.0, "pd_decode": 0.01}
    placed = plan_instance(cfg, "decode", 2, [HEAD, WORKER])
    assert placed.bundles == [{"CPU": 1.0, "pd_decode": 0.01}] * 2 and placed.strategy == "PACK"


def test_spread_when_no_node_holds_the_whole_group() -> None:
    cfg = ray_cfg(ray_resources={"decode": {"pd_decode": 1}})  # one whole unit per rank: one rank per node
    placed = plan_instance(cfg, "decode", 2, [HEAD, WORKER, WORKER2])
    assert placed.strategy == "SPREAD"
    assert unplaceable(placed, [HEAD, WORKER, WORKER2]) is None
    why = unplaceable(placed, [HEAD, WORKER])
    assert why is not None and "hold 1 bundle(s)" in why and "needs 2" in why
    big = plan_instance(ray_cfg(), "decode", 3, [HEAD])
    assert big.strategy == "SPREAD" and unplaceable(big, [HEAD]) is not None


def test_resources_no_node_has_are_named() -> None:
    cfg = ray_cfg(ray_resources={"prefill": {"pd_gpu_a100": 0.5}, "decode": {"pd_decode": 0.01}})
    problems = check_cluster(cfg, [HEAD, WORKER])
    assert problems == [("launcher.ray_resources.prefill", problems[0][1])]
    assert "pd_gpu_a100" in problems[0][1] and "10.0.0.2" in problems[0][1]
    assert check_cluster(ray_cfg(ray_resources={"decode": {"pd_decode": 0.01}}), [HEAD, WORKER]) == []
    one_cpu = RayNode("c", "10.0.0.9", {"CPU": 1.0})
    assert [f for f, _ in check_cluster(ray_cfg(), [one_cpu])] == ["instances[1]"]  # TP 2 on one CPU in all


def test_fields_of_the_local_launcher_are_refused() -> None:
    nodes = ray_cfg().model_copy(deep=True)
    nodes.parallel.nodes = DeploymentConfig.model_validate({"parallel": {"nodes": [{"address": "10.0.0.1"}]}
                                                            }).parallel.nodes
    with pytest.raises(PdlaunchError, match="parallel.nodes is not used") as caught:
        check_local_fields(nodes)
    assert caught.value.field == "parallel.nodes"
    grouped = DeploymentConfig.model_validate({"launcher": {"backend": "ray"}, "instances": [{"role": "prefill"},
                                               {"role": "decode", "node": 1}]})
    with pytest.raises(PdlaunchError, match="ray_resources") as caught:
        check_local_fields(grouped)
    assert caught.value.field == "instances[1].node"


def test_resource_fields_are_checked() -> None:
    with pytest.raises(ValidationError, match="Ray's own resource"):
        ray_cfg(ray_resources={"decode": {"CPU": 1}})
    with pytest.raises(ValidationError, match="greater than 0"):
        ray_cfg(ray_resources={"decode": {"pd_decode": 0}})
    with pytest.raises(ValidationError):
        ray_cfg(ray_resources={"gpu": {"x": 1}})  # not a role
    with pytest.raises(ValidationError):
        ray_cfg(ray_placement_timeout_seconds=0)


def test_an_address_nothing_listens_at_fails_fast_and_clearly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(PdlaunchError, match=f"no Ray cluster answers at 127.0.0.1:{port}") as caught:
        gcs_probe(f"127.0.0.1:{port}")
    assert caught.value.field == "launcher.ray_address"
    with pytest.raises(PdlaunchError, match="Ray Client address"):
        gcs_probe("ray://10.0.0.1:10001")
    with pytest.raises(PdlaunchError, match="not HOST:PORT"):
        gcs_probe("head-node")
    pytest.importorskip("ray", reason="check-config asks for the ray package before it probes the address")
    result = check(["--model", "tiny", "--device", "cpu", "--backend", "ray", "--ray-address", f"127.0.0.1:{port}"])
    assert result.exit_code == 1, result.output
    assert "--ray-address" in result.output and "no Ray cluster answers" in result.output
    assert "Traceback" not in result.output


def test_without_ray_installed_check_config_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(PdlaunchError, match="ray package") as caught:
        import_ray()
    assert "pip install 'pdlaunch[ray]'" in (caught.value.hint or "")
    result = check(["--model", "tiny", "--device", "cpu", "--backend", "ray"])
    assert result.exit_code == 1 and "pip install 'pdlaunch[ray]'" in result.output, result.output


def test_the_ray_launcher_keeps_proxy_restart_off_and_backs_off(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """The Ray launcher restarts an exited proxy as the local supervisor does: not at all with
    proxy.restart false, else after the backoff (not on every tick)."""
    import types

    from pdlaunch.launcher.backends import ray_deployment as backend
    from pdlaunch.launcher.backends.ray_run import RayDeploymentFailed
    from pdlaunch.launcher.process import ChildProcess

    monkeypatch.setattr(backend, "connect", lambda cfg: types.ModuleType("ray"))
    monkeypatch.setattr(backend, "live_nodes", lambda ray: [HEAD, WORKER, WORKER2])
    for restart in (False, True):
        cfg = ray_cfg().model_copy(update={"log_dir": str(tmp_path / str(restart))})
        cfg.proxy.restart = restart
        deployment = backend.RayDeployment(cfg, Console(file=io.StringIO()))
        proxy = deployment.proxy.process = ChildProcess("proxy", [sys.executable, "-c", "raise SystemExit(3)"],
                                                        tmp_path / f"proxy-{restart}.log")
        proxy.start()
        wait_for(lambda: proxy.poll() is not None, "the proxy to exit")
        if not restart:
            with pytest.raises(RayDeploymentFailed, match=r"proxy\.restart: false"):
                deployment.tick()
        else:
            deployment.tick()
            assert deployment.proxy.record.due is not None and proxy.poll() is not None  # waits
        proxy.close_log()


def test_ray_fields_without_the_ray_backend_are_refused_not_ignored() -> None:
    result = check(["--model", "tiny", "--device", "cpu", "--ray-address", "10.0.0.5:6379"])
    assert result.exit_code == 1 and "--backend ray" in result.output, result.output
    assert "ray-address" in result.output or "ray_address" in result.output, result.output
    assert check(["--model", "tiny", "--device", "cpu"]).exit_code == 0


def test_a_cluster_that_fails_after_the_connect_is_an_error_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ray.nodes()` raising (the GCS went away after `ray.init`) ends serve with our error naming
    launcher.ray_address, and the driver is disconnected."""
    ray = pytest.importorskip("ray", reason="pip install 'pdlaunch[ray]'")
    from pdlaunch.launcher.backends import ray_deployment as backend
    from pdlaunch.launcher.backends.ray_run import RayDeploymentFailed

    calls: list[str] = []

    class FailingRay:
        exceptions = ray.exceptions

        @staticmethod
        def nodes() -> list[object]:
            raise ray.exceptions.RaySystemError("GCS unavailable")

        @staticmethod
        def shutdown() -> None:
            calls.append("shutdown")

    monkeypatch.setattr(backend, "connect", lambda cfg: FailingRay)
    with pytest.raises(RayDeploymentFailed) as info:
        backend.RayDeployment(ray_cfg(), Console(file=io.StringIO()))
    assert info.value.field == "launcher.ray_address" and "GCS unavailable" in info.value.message
    assert calls == ["shutdown"]
