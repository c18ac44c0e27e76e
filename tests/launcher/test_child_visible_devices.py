"""An instance's CUDA_VISIBLE_DEVICES under a launcher that runs with one of its own (a shared host:
`CUDA_VISIBLE_DEVICES=1 pdlaunch serve ...`): the launcher numbers the devices it sees from 0, and an instance
placed on its device i must get the i-th entry of the launcher's list, not physical GPU i. Before, two deployments
started with CUDA_VISIBLE_DEVICES=0 and =1 both ran on GPU 0 (the second ran out of memory at start).

No GPU is needed: the host's GPU count is patched (pdlaunch/memory/host_devices.py).
"""

from __future__ import annotations

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.rules.security import SECRET_ENV
from pdlaunch.launcher.backends import slurm_node
from pdlaunch.launcher.plan import DeploymentPlan, plan_deployment
from pdlaunch.memory import host_devices
from pdlaunch.memory.host_devices import child_visible_devices
from tests.launcher.free_ports import free_on_both

SECRET = "child-visible-devices-secret-0123456"


def test_a_child_gets_the_launchers_own_device_names() -> None:
    assert child_visible_devices([0, 1], {}) == "0,1"  # no list of its own: the host's numbering
    assert child_visible_devices([0], {"CUDA_VISIBLE_DEVICES": "1"}) == "1"
    assert child_visible_devices([1, 0], {"CUDA_VISIBLE_DEVICES": "4, 6"}) == "6,4"
    uuids = "GPU-8a1b2c3d-0000-1111-2222-333344445555,GPU-9f8e7d6c-0000-1111-2222-333344445555"
    assert child_visible_devices([1], {"CUDA_VISIBLE_DEVICES": uuids}) == uuids.split(",")[1]
    assert child_visible_devices([], {"CUDA_VISIBLE_DEVICES": "3"}) == ""


@pytest.mark.parametrize("visible,expected", [(None, ["0", "1"]), ("1,3", ["1", "3"]), ("5,2", ["5", "2"])])
def test_each_local_instance_runs_on_the_gpu_the_launcher_was_given(
        monkeypatch: pytest.MonkeyPatch, visible: str | None, expected: list[str]) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(host_devices, "cuda_available", lambda: True)
    monkeypatch.setattr(host_devices, "device_count", lambda: 2)
    monkeypatch.setattr(host_devices, "device_total_bytes", lambda index=0: 80 << 30)
    cfg = DeploymentConfig.model_validate({
        "device": "cuda", "model": {"path": "tiny"}, "security": {"deployment_secret": SECRET},
        "instances": [{"role": "prefill"}, {"role": "decode"}]})
    cfg.proxy.port = 0  # picked free: other tests run next to this one
    plan = plan_deployment(cfg)
    assert [i.env["CUDA_VISIBLE_DEVICES"] for i in plan.local] == expected
    assert [i.spec.devices for i in plan.local] == [[0], [0]]  # each sees its one device as cuda:0


def _node1_plan(monkeypatch: pytest.MonkeyPatch, visible: str, slurm_step: bool) -> DeploymentPlan:
    """Node 1's plan of a two-node deployment whose prefill (TP 2) fills node 0's one listed GPU and continues on
    node 1 (rank 1, node 1's device 0), next to node 1's own decode (its device 1); node 1's launcher runs under
    `visible`. `slurm_step`: as a `--backend slurm` step's launcher (slurm_node.node_config, then serve's plan)."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(host_devices, "cuda_available", lambda: True)
    monkeypatch.setattr(host_devices, "device_count", lambda: len(visible.split(",")))
    monkeypatch.setattr(host_devices, "device_total_bytes", lambda index=0: 80 << 30)
    base = free_on_both(60, "child visible devices test")  # node 1's plan claims its fixed ports
    cfg = DeploymentConfig.model_validate({
        "device": "cuda", "model": {"path": "tiny"}, "security": {"deployment_secret": SECRET},
        "proxy": {"host": "0.0.0.0", "port": base},
        "parallel": {"nodes": [{"address": "127.0.0.1", "devices": [0]}, {"address": "127.0.0.2"}],
                     "master_port": base + 1},
        "kv_transfer": {"side_channel_host": "0.0.0.0", "side_channel_port": base + 10},
        "instances": [{"role": "prefill", "tp": 2, "node": 0, "base_port": base + 30},
                      {"role": "decode", "node": 1, "base_port": base + 40}]})
    if slurm_step:
        cfg.launcher.backend = "slurm"
        return plan_deployment(slurm_node.node_config(cfg.model_dump_json(), 1))
    cfg.parallel.node_rank = 1
    return plan_deployment(cfg)


@pytest.mark.parametrize("slurm_step", [False, True], ids=["serve --node-rank 1", "slurm step"])
@pytest.mark.parametrize("visible,expected", [("0,1", ("0", "1")), ("2,3", ("2", "3")), ("6,4", ("6", "4"))])
def test_a_rank_of_another_nodes_instance_runs_on_the_gpu_its_launcher_was_given(
        monkeypatch: pytest.MonkeyPatch, slurm_step: bool, visible: str, expected: tuple[str, str]) -> None:
    # A SLURM step's launcher sees the GPUs the step was given ("2,3" on a shared node without ConstrainDevices),
    # as does `CUDA_VISIBLE_DEVICES=2,3 pdlaunch serve --node-rank 1`: the rank placed on device 0 of the
    # launcher's numbering must run on the first of them, not on the node's GPU 0 (another job's).
    plan = _node1_plan(monkeypatch, visible, slurm_step)
    [rank] = plan.remote_ranks
    [decode] = plan.local
    assert (rank.name, rank.physical_device, decode.physical_devices) == ("prefill-0-rank1", 0, [1])
    assert (rank.env["CUDA_VISIBLE_DEVICES"], decode.env["CUDA_VISIBLE_DEVICES"]) == expected
    assert rank.spec.devices == [0, 0] and decode.spec.devices == [0]  # each sees its one device as cuda:0


def test_the_status_table_names_the_hosts_gpu_numbers() -> None:
    from pdlaunch.launcher.spawn import _cuda_label

    assert _cuda_label([0], {"CUDA_VISIBLE_DEVICES": "0"}) == "cuda:0"
    assert _cuda_label([0, 1], {"CUDA_VISIBLE_DEVICES": "2,3"}) == "cuda:2,3"  # was cuda:0,1 under =2,3
    uuid = "GPU-8a1b2c3d-0000-1111-2222-333344445555"
    assert _cuda_label([1], {"CUDA_VISIBLE_DEVICES": uuid}) == "cuda:1"  # a UUID: the launcher's numbering
    assert _cuda_label([1], {}) == "cuda:1"  # another node's instance: no list from this node
