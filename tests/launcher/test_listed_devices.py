"""Groups that list `devices` next to groups that list none, on one node (config/placement.py): a group listing
none takes the GPUs no group on its node lists, in order, so two instances never share a GPU by accident; when
too few are left, check-config and the launcher both stop naming that group's `devices` and the GPUs taken.
Sharing a GPU on purpose (two groups listing it) works as before.

No GPU is needed: the host's GPU count is patched (pdlaunch/memory/host_devices.py); check-config runs as a user
runs it, with --target-gpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.rules.security import SECRET_ENV
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.plan import DeploymentPlan, plan_deployment
from pdlaunch.memory import host_devices
from tests.config.cli_helpers import assert_invalid, check, write_yaml
from tests.launcher.free_ports import free_on_both

SECRET = "listed-devices-test-secret-012345"
GIB = 1 << 30


@pytest.fixture(autouse=True)
def _deployment_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _sees(monkeypatch: pytest.MonkeyPatch, gpus: int) -> None:
    """This machine, with `gpus` CUDA devices of 80 GiB."""
    monkeypatch.setattr(host_devices, "cuda_available", lambda: gpus > 0)
    monkeypatch.setattr(host_devices, "device_count", lambda: gpus)
    monkeypatch.setattr(host_devices, "device_total_bytes", lambda index=0: 80 * GIB)


def _config(instances: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"device": "cuda", "model": {"path": "tiny"}, "instances": instances, **extra}


def _plan(monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], gpus: int, node: int = 0) -> DeploymentPlan:
    _sees(monkeypatch, gpus)
    cfg = DeploymentConfig.model_validate({**config, "security": {"deployment_secret": SECRET}})
    cfg.parallel.node_rank = node
    cfg.proxy.port = 0  # picked free: other tests run next to this one
    return plan_deployment(cfg)


def _gpus(plan: DeploymentPlan) -> dict[str, list[int]]:
    return {i.spec.name: i.physical_devices for i in plan.local}


def _check(tmp_path: Path, config: dict[str, Any], gpus: int, *flags: str) -> Any:
    path = write_yaml(tmp_path, yaml.safe_dump(config))
    return check([str(path), "--target-gpus", str(gpus), "--target-gpu-memory", "80", *flags])


@pytest.mark.parametrize("order", ["listed first", "unlisted first"])
def test_a_group_listing_no_devices_skips_the_gpus_another_group_lists(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, order: str) -> None:
    listed = {"role": "prefill", "devices": [0]}
    unlisted = {"role": "decode", "count": 2}
    config = _config([listed, unlisted] if order == "listed first" else [unlisted, listed])
    assert _gpus(_plan(monkeypatch, config, 4)) == {"prefill-0": [0], "decode-0": [1], "decode-1": [2]}
    assert _check(tmp_path, config, 4).exit_code == 0

    tp2 = _config([{"role": "prefill", "devices": [2]}, {"role": "decode", "tp": 2}])
    assert _gpus(_plan(monkeypatch, tp2, 4)) == {"prefill-0": [2], "decode-0": [0, 1]}


def test_too_few_free_gpus_names_the_group_the_gpus_taken_and_how_to_share(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = _config([{"role": "prefill", "count": 2, "devices": [0, 1]}, {"role": "decode"}])
    with pytest.raises(PdlaunchError) as err:  # before: decode-0 silently shared GPU 0 with prefill-0
        _plan(monkeypatch, config, 2)
    assert err.value.field == "instances[1].devices"
    assert "instances[0].devices lists GPUs 0, 1" in err.value.message, err.value.message
    assert err.value.hint is not None and "gpu_memory_utilization at most 1/sharers" in err.value.hint
    result = _check(tmp_path, config, 2)
    assert_invalid(result, "instances[1].devices", "instances[0].devices lists GPUs 0, 1")
    assert "gpu_memory_utilization at most 1/sharers" in result.output

    one_gpu = _config([{"role": "prefill", "devices": [0]}, {"role": "decode"}])
    with pytest.raises(PdlaunchError) as err:
        _plan(monkeypatch, one_gpu, 1)
    assert err.value.field == "instances[1].devices" and "instances[0].devices lists GPU 0" in err.value.message
    assert_invalid(_check(tmp_path, one_gpu, 1), "instances[1].devices", "instances[0].devices lists GPU 0")


def test_groups_listing_the_same_gpu_still_share_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = _config([{"role": "prefill", "devices": [0]}, {"role": "decode", "devices": [0]},
                      {"role": "decode"}], cache={"gpu_memory_utilization": 0.45})
    assert _gpus(_plan(monkeypatch, config, 2)) == {"prefill-0": [0], "decode-0": [0], "decode-1": [1]}
    assert _check(tmp_path, config, 2, "--transfer-mode", "push").exit_code == 0


def _nodes(node0: dict[str, Any], node1: dict[str, Any], instances: list[dict[str, Any]]) -> dict[str, Any]:
    """Two nodes; the ports each node must know of the other's instances are fixed, and free here."""
    base = free_on_both(1 + 2 * len(instances), "listed devices test")
    return _config([{**group, "base_port": base + 1 + 2 * i} for i, group in enumerate(instances)],
                   parallel={"nodes": [{"address": "127.0.0.1", **node0}, {"address": "127.0.0.2", **node1}],
                             "master_port": base},
                   kv_transfer={"side_channel_host": "0.0.0.0"})


def test_each_node_of_several_skips_the_gpus_its_groups_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    groups = [{"role": "prefill", "node": 0, "devices": [1]}, {"role": "prefill", "node": 0},
              {"role": "decode", "node": 1, "devices": [0]}, {"role": "decode", "node": 1}]
    config = _nodes({"devices": [0, 1]}, {}, groups)  # node 1 lists none: its own launcher checks its GPUs
    assert _gpus(_plan(monkeypatch, config, 2, node=0)) == {"prefill-0": [1], "prefill-1": [0]}
    assert _gpus(_plan(monkeypatch, config, 2, node=1)) == {"decode-0": [0], "decode-1": [1]}
    assert _check(tmp_path, config, 2).exit_code == 0

    with pytest.raises(PdlaunchError) as err:  # node 1 sees one GPU, which decode-0 lists
        _plan(monkeypatch, config, 1, node=1)
    assert err.value.field == "instances[3].devices" and "instances[2].devices lists GPU 0" in err.value.message
    assert_invalid(_check(tmp_path, config, 1), "instances[3].devices", "instances[2].devices lists GPU 0")

    full = _nodes({"devices": [0, 1]}, {}, [{"role": "prefill", "node": 0, "count": 2, "devices": [0, 1]},
                                            {"role": "prefill", "node": 0}, {"role": "decode", "node": 1}])
    with pytest.raises(PdlaunchError) as err:
        _plan(monkeypatch, full, 2, node=0)
    assert err.value.field == "instances[1].devices" and "instances[0].devices lists GPUs 0, 1" in err.value.message
    assert_invalid(_check(tmp_path, full, 2), "instances[1].devices", "parallel.nodes[0].devices lists")


def test_a_spanning_group_skips_the_gpus_listed_on_the_nodes_it_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    groups = [{"role": "decode", "node": 0, "devices": [0]}, {"role": "prefill", "node": 0, "tp": 4},
              {"role": "decode", "node": 1, "devices": [0]}]
    config = _nodes({"devices": [0, 1, 2]}, {"devices": [0, 1, 2]}, groups)
    node0 = _plan(monkeypatch, config, 3, node=0)
    node1 = _plan(monkeypatch, config, 3, node=1)
    assert _gpus(node0) == {"decode-0": [0], "prefill-0": [1, 2]}
    assert {(r.instance, r.physical_device) for r in node1.remote_ranks} == {("prefill-0", 1), ("prefill-0", 2)}
