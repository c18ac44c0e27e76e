"""Multi-node mistakes caught before anything runs: an unreachable side channel, a node that never
comes up, a TP group larger than its node and the nodes after it together; where a spanning
group's ranks go. No engine is started here."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.distributed.placement import PLACEMENT_ENV, RankPlacement
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.plan import plan_deployment
from tests.config.cli_helpers import check, invoke

SECURITY = {"deployment_secret": "multinode-test-secret-0123456789"}
NODES = {"nodes": [{"address": "127.0.0.1"}, {"address": "127.0.0.2"}]}


def _cfg(tmp_path: Path, **data: object) -> DeploymentConfig:
    return DeploymentConfig.model_validate({"device": "cpu", "log_dir": str(tmp_path / "logs"),
                                            "proxy": {"port": 0}, "parallel": NODES, "security": SECURITY, **data})


def test_serve_refuses_a_loopback_side_channel_between_nodes(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text("parallel: {nodes: [{address: 127.0.0.1}, {address: 127.0.0.2}]}\n"
                    "security: {deployment_secret: multinode-test-secret-0123456789}\n"
                    "instances:\n  - {role: prefill, node: 0}\n  - {role: decode, node: 1, base_port: 9100}\n")
    result = invoke(["serve", str(path), "--model", "tiny", "--device", "cpu", "--log-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "kv_transfer.side_channel_host" in result.output and "0.0.0.0" in result.output


def test_loopback_side_channel_is_fine_when_prefill_and_decode_share_a_node(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, instances=[{"role": "prefill", "node": 1, "base_port": 9100},
                                    {"role": "decode", "node": 1, "base_port": 9200}])
    with Deployment(cfg, Console(quiet=True)) as deployment:
        assert [p.node for p in deployment.plan.instances] == [1, 1]


def test_node0_names_the_instances_of_a_node_that_never_came_up(tmp_path: Path) -> None:
    # Node 0 runs only the proxy; nothing answers at node 1's address, so the wait must time out.
    cfg = _cfg(tmp_path, kv_transfer={"side_channel_host": "0.0.0.0"},
               instances=[{"role": "prefill", "node": 1, "base_port": 9100},
                          {"role": "decode", "node": 1, "base_port": 9101}])
    with Deployment(cfg, Console(quiet=True)) as deployment:
        with pytest.raises(PdlaunchError) as err:
            deployment.start(ready_timeout=1.0)
        assert deployment.children == []
    message = err.value.render()
    assert "prefill-0 on node 1 (http://127.0.0.2:9100)" in message and "decode-0 on node 1" in message
    assert "--node-rank" in message


def test_check_config_lets_a_tp_group_span_the_nodes_after_its_own(tmp_path: Path) -> None:
    # prefill TP 4 fills node 0's two GPUs, then node 1's two: decode TP 2 no longer fits on node 1.
    path = tmp_path / "span.yaml"
    path.write_text("parallel: {nodes: [{address: a, devices: [0, 1]}, {address: b, devices: [0, 1]}], "
                    "master_port: 29500}\n"
                    "kv_transfer: {side_channel_host: 0.0.0.0}\n"
                    "instances:\n  - {role: prefill, tp: 4, node: 0}\n  - {role: decode, tp: 2, node: 1}\n")
    args = [str(path), "--model", "tiny", "--device", "cuda", "--target-gpus", "2", "--target-gpu-memory", "80"]
    result = check(args)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert not any("instances[0].tp" in line for line in errors), result.output
    assert any("node 1 needs 4 GPUs" in line for line in errors), result.output


def test_check_config_refuses_a_tp_group_larger_than_the_nodes_together(tmp_path: Path) -> None:
    path = tmp_path / "span.yaml"
    path.write_text("parallel: {nodes: [{address: a, devices: [0, 1]}, {address: b, devices: [0, 1]}], "
                    "master_port: 29500}\n"
                    "kv_transfer: {side_channel_host: 0.0.0.0}\n"
                    "instances:\n  - {role: prefill, tp: 8, node: 0}\n  - {role: decode, tp: 2, node: 1}\n")
    args = [str(path), "--model", "tiny", "--device", "cuda", "--target-gpus", "2", "--target-gpu-memory", "80"]
    result = check(args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error: instances[0].tp:")]
    assert lines and "TP 8 needs more GPUs than nodes 0..1 have together (4" in lines[0], result.output


def test_check_config_keeps_a_group_on_a_node_that_lists_no_devices(tmp_path: Path) -> None:
    # Without devices listed the nodes' GPU counts are unknown to each other: the group stays on node 0
    # (every node plans the same), and the target host's 2 GPUs are too few there.
    path = tmp_path / "span.yaml"
    path.write_text("parallel: {nodes: [{address: a}, {address: b}], master_port: 29500}\n"
                    "kv_transfer: {side_channel_host: 0.0.0.0}\n"
                    "instances:\n  - {role: prefill, tp: 4, node: 0}\n  - {role: decode, tp: 2, node: 1}\n")
    args = [str(path), "--model", "tiny", "--device", "cuda", "--target-gpus", "2", "--target-gpu-memory", "80"]
    result = check(args)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    [node0] = [line for line in errors if line.startswith("error: parallel.nodes[0].devices:")]
    assert "node 0 needs 4 GPUs" in node0 and "devices: [0, 1]" in node0, result.output
    assert not any("node 1" in line or "instances[0].tp" in line for line in errors), result.output


def test_spanning_group_plan_places_ranks_and_needs_a_fixed_rendezvous_port(tmp_path: Path) -> None:
    # CPU: a node's `devices` are rank slots. prefill-0 (TP 2) fills node 0's one slot, then one of node 1's;
    # node 1's launcher plans that rank next to its own decode-0.
    nodes = {"nodes": [{"address": "127.0.0.1", "devices": [0]}, {"address": "127.0.0.2", "devices": [0, 1, 2]}]}
    data = {"kv_transfer": {"side_channel_host": "0.0.0.0", "side_channel_port": 5600},
            "instances": [{"role": "prefill", "tp": 2, "node": 0, "base_port": 9100},
                          {"role": "decode", "tp": 2, "node": 1, "base_port": 9200}]}
    with pytest.raises(PdlaunchError) as err:
        plan_deployment(_cfg(tmp_path, parallel={**nodes, "node_rank": 1}, **data))
    assert err.value.field == "parallel.master_port"
    plan = plan_deployment(_cfg(tmp_path, parallel={**nodes, "node_rank": 1, "master_port": 29500}, **data))
    assert [p.spec.name for p in plan.local] == ["decode-0"]
    [rank] = plan.remote_ranks
    assert (rank.name, rank.rank, rank.spec.master_port) == ("prefill-0-rank1", 1, 29500)
    assert rank.placement.nodes == [0, 1] and rank.placement.hosts == ["127.0.0.1", "127.0.0.2"]
    # node 1's side channels in group order: prefill-0 rank 1 on 5600 (its connector binds
    # side_channel_port + tp_rank), decode-0 ranks 0-1 on 5601-5602
    assert rank.spec.host == "127.0.0.2" and rank.spec.side_channel_port + 1 == 5600
    assert plan.local[0].spec.side_channel_port == 5601
    node0 = plan_deployment(_cfg(tmp_path, parallel={**nodes, "master_port": 29500}, **data))
    prefill = node0.instances[0]
    assert prefill.local and prefill.spec.master_port == 29500 and prefill.spec.side_channel_port == 5600
    assert RankPlacement.model_validate_json(prefill.env[PLACEMENT_ENV]).remote_ranks() == [1]
    assert node0.remote_ranks == [] and PLACEMENT_ENV not in node0.instances[1].env


def test_instances_rendezvous_on_their_own_node(tmp_path: Path) -> None:
    # parallel.master_addr names node 0; node 1's TP groups must not join node 0's stores.
    cfg = _cfg(tmp_path, parallel={**NODES, "node_rank": 1, "master_addr": "10.0.0.1", "master_port": 29500},
               kv_transfer={"side_channel_host": "0.0.0.0"},
               instances=[{"role": "prefill", "node": 0, "base_port": 9100},
                          {"role": "decode", "node": 0, "base_port": 9101}])
    with Deployment(cfg, Console(quiet=True)) as deployment:
        assert deployment.start(ready_timeout=1.0)  # node 1 runs nothing: nothing to wait for
    written = DeploymentConfig.model_validate_json((tmp_path / "logs" / "deployment.json").read_text())
    assert written.parallel.master_addr == "127.0.0.1"
    assert written.model_copy(update={"parallel": cfg.parallel}) == cfg
