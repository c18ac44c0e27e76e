"""A TP group spanning nodes with a loopback kv_transfer.side_channel_host: refused only where a side channel opens.

The launcher's plan (launcher/plan.py) refuses it for a prefill or decode group whose connector is nixl or mooncake,
whose ranks on other nodes would advertise an address nobody can reach. The config rule (config/rules/roles.py,
which check-config and serve's loader both run) refused it with the storage connector too, which opens no side
channel (KV moves through files), telling the user to set a field storage never reads. Both now ask one question
(roles.spanning_side_channel_unreachable)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.config.loader import checked_deployment, load_deployment
from pdlaunch.errors import ConfigError, PdlaunchError
from pdlaunch.launcher.plan import check_side_channel_reach, plan_deployment
from tests.config.cli_helpers import FREE_PORT, assert_invalid, check, write_yaml
from tests.helpers.ports import free_ports

# Node 0 lists three rank slots, so a TP 4 group placed there spans into node 1; its peer stays on node 0 (it lists
# its own slot), so prefill and decode never sit on different nodes and only the spanning rule is asked.
NODES = ("device: cpu\nmodel: {path: tiny}\nsecurity: {deployment_secret: spanning-test-secret-0123456789}\n"
         "parallel:\n  master_port: MASTER\n"
         "  nodes: [{address: 127.0.0.1, devices: [0, 1, 2]}, {address: 127.0.0.2, devices: [0, 1]}]\n")
DISAGGREGATED = NODES + ("instances:\n  - {role: decode, tp: 1, node: 0, devices: [0], base_port: DECODE}\n"
                         "  - {role: prefill, tp: 4, node: 0, base_port: PREFILL}\n")
COLOCATED = NODES + "colocated: true\ninstances:\n  - {role: colocated, tp: 4, node: 0, base_port: PREFILL}\n"


def _yaml(tmp_path: Path, text: str) -> Path:
    master, decode, prefill = free_ports(3)
    text = text.replace("MASTER", str(master)).replace("DECODE", str(decode)).replace("PREFILL", str(prefill))
    return write_yaml(tmp_path, text)


def _serve_refuses(path: Path) -> str | None:
    """The field serve's launcher on each node refuses the deployment for, or None: each node plans it."""
    cfg = load_deployment(path, {"proxy.port": 0})
    for node in range(len(cfg.parallel.nodes)):
        here = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"node_rank": node})})
        try:
            check_side_channel_reach(here)
            plan_deployment(here)
        except PdlaunchError as exc:
            return exc.field
    return None


def _serve_config_problems(path: Path) -> list[str]:
    """The fields of the problems serve's config check (before any plan) stops on."""
    try:
        checked_deployment(path, {"proxy.port": int(FREE_PORT[1])})
    except ConfigError as exc:
        return [field for field, _ in exc.problems]
    return []


@pytest.mark.parametrize("connector", ["nixl", "mooncake"])
def test_a_group_spanning_nodes_with_a_loopback_side_channel_is_refused_by_both(tmp_path: Path,
                                                                               connector: str) -> None:
    path = _yaml(tmp_path, DISAGGREGATED + f"kv_transfer: {{connector: {connector}}}\n")
    assert_invalid(check([str(path), *FREE_PORT]), "kv_transfer.side_channel_host",
                   "instances[1]'s TP group spans nodes, but the KV side channel binds 127.0.0.1")
    assert _serve_refuses(path) == "kv_transfer.side_channel_host"
    fixed = _yaml(tmp_path, DISAGGREGATED + f"kv_transfer: {{connector: {connector}, side_channel_host: 0.0.0.0}}\n")
    result = check([str(fixed), *FREE_PORT])
    assert "kv_transfer.side_channel_host" not in result.output, result.output
    assert result.exit_code == 0 or connector == "mooncake", result.output  # mooncake: unless it is not installed
    assert _serve_refuses(fixed) is None


def test_storage_is_not_told_to_change_a_side_channel_it_does_not_open(tmp_path: Path) -> None:
    # The storage connector refuses TP > 1 on prefill and decode anyway (roles.tp_support_problems): that is the one
    # problem to fix. It was joined by "set kv_transfer.side_channel_host to 0.0.0.0", a field storage never reads.
    path = _yaml(tmp_path, DISAGGREGATED + "kv_transfer: {connector: storage}\n")
    result = check([str(path), *FREE_PORT])
    assert_invalid(result, "kv_transfer.connector", "the storage connector does not run with TP > 1 yet")
    assert "side_channel_host" not in result.output, result.output
    assert _serve_config_problems(path) == ["kv_transfer.connector"]
    assert _serve_refuses(path) is None


def test_a_colocated_group_spanning_nodes_passes_both(tmp_path: Path) -> None:
    path = _yaml(tmp_path, COLOCATED)  # no KV moves between instances: no side channel opens
    result = check([str(path), *FREE_PORT])
    assert result.exit_code == 0, result.output
    assert "side_channel_host" not in result.output, result.output
    assert _serve_config_problems(path) == []
    assert _serve_refuses(path) is None


def test_a_group_that_lists_its_own_devices_does_not_span_nodes(tmp_path: Path) -> None:
    # Node 0 lists three rank slots, but the TP 4 prefill group lists its own four (config/port_plan.py places them all
    # on the group's node; on CPU no rule holds a group's devices to its node's list). check-config said it spans
    # nodes and asked for parallel.master_port and a side_channel_host of 0.0.0.0; serve planned it on node 0.
    own = ("device: cpu\nmodel: {path: tiny}\nsecurity: {deployment_secret: spanning-test-secret-0123456789}\n"
           "parallel:\n  nodes: [{address: 127.0.0.1, devices: [0, 1, 2]}, {address: 127.0.0.2, devices: [0, 1]}]\n"
           "instances:\n  - {role: decode, tp: 1, node: 0, devices: [0], base_port: DECODE}\n"
           "  - {role: prefill, tp: 4, node: 0, devices: [0, 1, 2, 3], base_port: PREFILL}\n")
    path = _yaml(tmp_path, own)
    result = check([str(path), *FREE_PORT])
    assert result.exit_code == 0, result.output
    assert "spans nodes" not in result.output, result.output
    assert _serve_config_problems(path) == []
    assert _serve_refuses(path) is None
    # Without its own devices it takes node 0's two free slots and node 1's two: it spans, and both say so.
    spanning = _yaml(tmp_path, own.replace(", devices: [0, 1, 2, 3]", ""))
    assert_invalid(check([str(spanning), *FREE_PORT]), "parallel.master_port",
                   "instances[1] has TP 4 but node 0 lists 3 device(s), so its TP group spans nodes")
    assert _serve_refuses(spanning) == "parallel.master_port"
