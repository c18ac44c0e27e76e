"""One port plan (config/port_plan.py): the ports every node's launcher binds are exactly the fixed
ranges check-config reports and checks for collisions, on one node, on several, and for a TP group
whose ranks span nodes."""

from __future__ import annotations

from typing import Any

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.rules.resources import port_plan, port_problems
from pdlaunch.distributed.placement import PLACEMENT_ENV, RankPlacement
from pdlaunch.launcher.plan import DeploymentPlan, plan_deployment
from tests.launcher.free_ports import free_on_both

SECRET = {"deployment_secret": "port-plan-test-secret-0123456789"}
TWO_NODES = [{"address": "127.0.0.1"}, {"address": "127.0.0.2"}]
# CPU: a node's devices are rank slots. prefill TP 2 fills node 0's one slot, then takes one of node 1's.
SPANNING_NODES = [{"address": "127.0.0.1", "devices": [0]}, {"address": "127.0.0.2", "devices": [0, 1, 2]}]


def _cfg(base: int, nodes: list[dict[str, Any]], instances: list[dict[str, Any]]) -> DeploymentConfig:
    """Every port fixed, from `base`: proxy, then rendezvous, side channel and HTTP ranges above it."""
    return DeploymentConfig.model_validate({
        "device": "cpu", "security": SECRET, "proxy": {"port": base},
        "parallel": {"nodes": nodes, "master_port": base + 1},
        "kv_transfer": {"side_channel_host": "0.0.0.0", "side_channel_port": base + 10},
        "instances": [{**group, "base_port": base + 20 + 5 * i} for i, group in enumerate(instances)],
    })


def _node_plan(cfg: DeploymentConfig, node: int) -> DeploymentPlan:
    return plan_deployment(cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"node_rank": node})}))


def launcher_ports(cfg: DeploymentConfig) -> set[tuple[int, int]]:
    """(node, port) for every port that some node's launcher hands to one of its processes."""
    found: set[tuple[int, int]] = set()
    for node in range(max(1, len(cfg.parallel.nodes))):
        plan = _node_plan(cfg, node)
        if plan.proxy_port is not None:
            found.add((node, plan.proxy_port))
        for instance in plan.local:
            spec = instance.spec
            found.add((node, spec.port))
            if spec.master_port is not None:
                found.add((node, spec.master_port))
            placed = instance.env.get(PLACEMENT_ENV)
            rank_nodes = RankPlacement.model_validate_json(placed).nodes if placed else [node] * spec.tp
            if spec.side_channel_port is not None:  # its connector binds side_channel_port + tp rank
                found |= {(node, spec.side_channel_port + r) for r, n in enumerate(rank_nodes) if n == node}
        for rank in plan.remote_ranks:
            assert rank.spec.side_channel_port is not None
            found.add((node, rank.spec.side_channel_port + rank.rank))
    return found


def check_config_ports(cfg: DeploymentConfig) -> set[tuple[int, int]]:
    return {(r.node, port) for r in port_plan(cfg) for port in range(r.first, r.last + 1)}


CASES = {
    "single node": ([], [{"role": "prefill", "count": 2, "tp": 2}, {"role": "decode", "count": 1},
                         {"role": "decode", "count": 1, "tp": 2}]),
    "multi-node": (TWO_NODES, [{"role": "prefill", "tp": 2, "node": 0}, {"role": "decode", "count": 2, "node": 1},
                               {"role": "decode", "tp": 2, "node": 1}]),
    "TP group spanning nodes": (SPANNING_NODES, [{"role": "prefill", "tp": 2, "node": 0},
                                                 {"role": "decode", "tp": 2, "node": 1}]),
}


@pytest.mark.parametrize("case", CASES)
def test_launcher_binds_exactly_the_ports_check_config_plans(case: str) -> None:
    nodes, instances = CASES[case]
    cfg = _cfg(free_on_both(40, "port plan test"), nodes, instances)
    assert launcher_ports(cfg) == check_config_ports(cfg)
    assert port_problems(cfg) == []


def test_a_spanning_group_takes_side_channel_ports_on_every_node_it_runs_on() -> None:
    cfg = _cfg(20000, SPANNING_NODES, [{"role": "prefill", "tp": 2, "node": 0}, {"role": "decode", "tp": 2, "node": 1}])
    side = {(r.node, r.first, r.count) for r in port_plan(cfg) if r.field == "kv_transfer.side_channel_port"}
    # node 0: prefill-0 rank 0; node 1: prefill-0 rank 1, then decode-0 ranks 0-1.
    assert side == {(0, 20010, 1), (1, 20010, 3)}
    rendezvous = {(r.node, r.first, r.count) for r in port_plan(cfg) if r.field == "parallel.master_port"}
    assert rendezvous == {(0, 20001, 1), (1, 20001, 1)}  # each group's rank 0 hosts its store on its node


def test_collision_with_a_spanning_groups_rank_is_reported() -> None:
    # decode-0's HTTP port is the third side-channel port of node 1, taken by the prefill's rank 1.
    cfg = _cfg(20000, SPANNING_NODES, [{"role": "prefill", "tp": 2, "node": 0}, {"role": "decode", "tp": 2, "node": 1}])
    cfg.instances[1].base_port = 20012
    [found] = port_problems(cfg)
    assert found.field == "kv_transfer.side_channel_port" and "20010-20012" in found.message
    assert "instances[1].base_port" in found.message and "node 1" in found.message


def test_every_rendezvous_port_of_a_node_is_planned() -> None:
    # Two TP groups on node 0: master_port and master_port + 1; the proxy on master_port + 1 collides.
    cfg = _cfg(20000, [], [{"role": "prefill", "tp": 2}, {"role": "decode", "tp": 2}])
    cfg.proxy.port = 20002
    assert any(p.field == "parallel.master_port" and "20001-20002" in p.message for p in port_problems(cfg))
