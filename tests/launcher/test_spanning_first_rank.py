"""A TP group larger than its node's listed `devices` spans the nodes after it, but each of its instances starts
on its own node: rank 0 serves the instance's HTTP API there (config/placement.py). When the devices of that
node are all taken before an instance of the group comes (by an earlier instance of the same group, or by the
GPUs other groups list there), the instance cannot start: check-config and every node's launcher say so on the
group's field, instead of planning an instance on node 0 with no GPU while another node runs its rank 0.

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
from pdlaunch.config.validate import resolve
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.plan import DeploymentPlan, plan_deployment
from pdlaunch.memory import host_devices
from tests.config.cli_helpers import assert_invalid, check, write_yaml
from tests.launcher.free_ports import free_on_both

SECRET = "spanning-first-rank-test-secret-01"
GIB = 1 << 30
BASE = 20000  # fixed ports (every node must know the others'): the refused plans stop before claiming them


@pytest.fixture(autouse=True)
def _deployment_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _config(instances: list[dict[str, Any]], base: int = BASE) -> dict[str, Any]:
    """Node 0 lists GPUs 0 and 1, so a TP 4 group there spans to node 1, which lists none."""
    return {"device": "cuda", "model": {"path": "tiny"},
            "parallel": {"nodes": [{"address": "127.0.0.1", "devices": [0, 1]}, {"address": "127.0.0.2"}],
                         "master_port": base},
            "kv_transfer": {"side_channel_host": "0.0.0.0"},
            "instances": [{**group, "base_port": base + 10 + 5 * i} for i, group in enumerate(instances)]}


def _plan(monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], node: int) -> DeploymentPlan:
    monkeypatch.setattr(host_devices, "cuda_available", lambda: True)
    monkeypatch.setattr(host_devices, "device_count", lambda: 8)
    monkeypatch.setattr(host_devices, "device_total_bytes", lambda index=0: 80 * GIB)
    cfg = DeploymentConfig.model_validate({**config, "security": {"deployment_secret": SECRET}})
    cfg.parallel.node_rank = node
    cfg.proxy.port = 0  # picked free
    return plan_deployment(cfg)


def _check(tmp_path: Path, config: dict[str, Any]) -> Any:
    path = write_yaml(tmp_path, yaml.safe_dump(config))
    return check([str(path), "--target-gpus", "8", "--target-gpu-memory", "80"])


CASES = {
    # prefill-0 takes node 0's two GPUs and two of node 1's; prefill-1 finds node 0 full.
    "an earlier instance of the group": ([{"role": "prefill", "tp": 4, "count": 2}, {"role": "decode", "node": 1}],
                                         0),
    # The two prefill instances of group 0 list both of node 0's GPUs: none is left for group 1's rank 0.
    "the GPUs another group lists": ([{"role": "prefill", "count": 2, "devices": [0, 1]}, {"role": "prefill", "tp": 4},
                                      {"role": "decode", "node": 1}], 1),
}


@pytest.mark.parametrize("case", CASES)
def test_an_instance_whose_node_has_no_gpu_left_for_its_rank_0_is_refused(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, case: str) -> None:
    instances, group = CASES[case]
    config = _config(instances)
    for node in (0, 1):  # every node's launcher plans the whole deployment
        with pytest.raises(PdlaunchError) as err:
            _plan(monkeypatch, config, node)
        assert err.value.field == f"instances[{group}].tp", err.value
        assert "rank 0" in err.value.message and "node 0" in err.value.message, err.value.message
        assert err.value.hint is not None and "parallel.nodes[0].devices" in err.value.hint
    assert_invalid(_check(tmp_path, config), f"instances[{group}].tp", "rank 0")


def test_a_spanning_instance_with_a_gpu_left_on_its_node_starts_there(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    base = free_on_both(30, "spanning first rank test")  # these plans claim them
    config = _config([{"role": "prefill", "devices": [0]}, {"role": "prefill", "tp": 4}, {"role": "decode", "node": 1}],
                     base)
    node0 = _plan(monkeypatch, config, 0)
    assert {i.spec.name: i.physical_devices for i in node0.local} == {"prefill-0": [0], "prefill-1": [1]}
    node1 = _plan(monkeypatch, config, 1)
    assert sorted((r.rank, r.physical_device) for r in node1.remote_ranks) == [(1, 0), (2, 1), (3, 2)]
    assert _check(tmp_path, config).exit_code == 0


def test_a_spanning_group_whose_tp_came_from_the_role_names_that_key_or_flag(monkeypatch: pytest.MonkeyPatch,
                                                                              tmp_path: Path) -> None:
    """The group sets no tp: its TP size is --prefill-tp's (parallel.prefill_tp), which the refusal names, not the
    `instances[0].tp` the user never wrote."""
    config = _config([{"role": "prefill", "count": 2}, {"role": "decode", "node": 1}])
    config["parallel"]["prefill_tp"] = 4
    monkeypatch.setattr(host_devices, "cuda_available", lambda: True)
    monkeypatch.setattr(host_devices, "device_count", lambda: 8)
    monkeypatch.setattr(host_devices, "device_total_bytes", lambda index=0: 80 * GIB)
    cfg = resolve(DeploymentConfig.model_validate({**config, "security": {"deployment_secret": SECRET}}), None)
    cfg.proxy.port = 0
    with pytest.raises(PdlaunchError) as err:  # the launcher plans the resolved config: TP per group filled in
        plan_deployment(cfg)
    assert err.value.field == "parallel.prefill_tp", err.value
    config["parallel"].pop("prefill_tp")
    path = write_yaml(tmp_path, yaml.safe_dump(config))
    assert_invalid(check([str(path), "--prefill-tp", "4", "--target-gpus", "8", "--target-gpu-memory", "80"]),
                   "--prefill-tp", "rank 0")

