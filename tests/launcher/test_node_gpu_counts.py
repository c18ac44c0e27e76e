"""Nodes that see different numbers of GPUs still plan one deployment (config/placement.py): every node's
launcher starts each rank of each instance exactly once between them, the ports they claim are the ones
the `--backend slurm` batch process probes (whatever GPUs its own machine has), and a node that sees fewer
GPUs than the plan puts on it stops with an error naming parallel.nodes[K].devices.

No GPU is needed: each node's GPU count is this machine's, patched (pdlaunch/memory/host_devices.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.rules.resources import port_plan
from pdlaunch.config.validate import validate_deployment
from pdlaunch.distributed.placement import PLACEMENT_ENV, RankPlacement
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.backends import slurm_node
from pdlaunch.launcher.backends.slurm import DEPLOYMENT_ENV
from pdlaunch.launcher.plan import DeploymentPlan, plan_deployment
from pdlaunch.memory import host_devices
from tests.launcher.free_ports import free_on_both

SECRET = {"deployment_secret": "node-gpu-counts-test-secret-0123"}
GIB = 1 << 30

# (nodes, instances, the GPUs each node's launcher sees)
SCENARIOS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]] = {
    # Node 1 sees fewer GPUs than prefill's TP: planned with its own count it would place rank 3 of
    # prefill-0 on itself while node 0 runs all four ranks.
    "two nodes listing no devices": (
        [{"address": "127.0.0.1"}, {"address": "127.0.0.2"}],
        [{"role": "prefill", "tp": 4, "node": 0}, {"role": "decode", "tp": 1, "node": 1}],
        [4, 3]),
    # prefill-0 fills node 0's two listed GPUs and node 1's one, then takes one of node 2's, which lists none.
    "a spanning group ending on a node listing none": (
        [{"address": "127.0.0.1", "devices": [0, 1]}, {"address": "127.0.0.2", "devices": [0]},
         {"address": "127.0.0.3"}],
        [{"role": "prefill", "tp": 4, "node": 0}, {"role": "decode", "tp": 2, "node": 2}],
        [8, 4, 3]),
}


def _cfg(nodes: list[dict[str, Any]], instances: list[dict[str, Any]], base: int, **parallel: Any) -> DeploymentConfig:
    """Every port fixed, from `base`: what the batch process can probe."""
    return DeploymentConfig.model_validate({
        "device": "cuda", "model": {"path": "tiny"}, "security": SECRET, "proxy": {"port": base},
        "parallel": {"nodes": nodes, "master_port": base + 1, **parallel},
        "kv_transfer": {"side_channel_host": "0.0.0.0", "side_channel_port": base + 10},
        "instances": [{**group, "base_port": base + 30 + 5 * i} for i, group in enumerate(instances)],
    })


def _sees(monkeypatch: pytest.MonkeyPatch, gpus: int) -> None:
    """This machine, as a node with `gpus` CUDA devices of 80 GiB."""
    monkeypatch.setattr(host_devices, "cuda_available", lambda: gpus > 0)
    monkeypatch.setattr(host_devices, "device_count", lambda: gpus)
    monkeypatch.setattr(host_devices, "device_total_bytes", lambda index=0: 80 * GIB)


def _node_plan(monkeypatch: pytest.MonkeyPatch, cfg: DeploymentConfig, node: int, gpus: int) -> DeploymentPlan:
    _sees(monkeypatch, gpus)
    return plan_deployment(cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"node_rank": node})}))


def _rank_nodes(env: dict[str, str], node: int, tp: int) -> list[int]:
    placed = env.get(PLACEMENT_ENV)
    return RankPlacement.model_validate_json(placed).nodes if placed else [node] * tp


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rank_starts_once_whatever_gpus_each_node_sees(monkeypatch: pytest.MonkeyPatch, scenario: str) -> None:
    nodes, instances, gpus = SCENARIOS[scenario]
    cfg = _cfg(nodes, instances, free_on_both(60, "node GPU counts test"))
    started: list[tuple[str, int, int]] = []  # (instance, TP rank, node whose launcher starts it)
    placements: dict[str, set[tuple[int, ...]]] = {}  # instance -> its ranks' nodes, as each node plans them
    for node, count in enumerate(gpus):
        plan = _node_plan(monkeypatch, cfg, node, count)
        for instance in plan.instances:
            if instance.local:
                ranks = _rank_nodes(instance.env, node, instance.spec.tp)
                placements.setdefault(instance.spec.name, set()).add(tuple(ranks))
                started += [(instance.spec.name, r, node) for r, n in enumerate(ranks) if n == node]
                assert all(device < count for device in instance.physical_devices)
        for rank in plan.remote_ranks:
            placements.setdefault(rank.instance, set()).add(tuple(rank.placement.nodes))
            started.append((rank.instance, rank.rank, node))
            assert rank.physical_device is not None and rank.physical_device < count
    expected = sorted((f"{g['role']}-0", r, node) for g in instances
                      for r, node in enumerate(next(iter(placements[f"{g['role']}-0"]))))
    assert sorted(started) == expected  # each rank once, by the node its placement names
    assert all(len(seen) == 1 for seen in placements.values()), placements  # every node placed it alike


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_batch_process_probes_the_ports_the_nodes_claim(monkeypatch: pytest.MonkeyPatch, scenario: str) -> None:
    nodes, instances, gpus = SCENARIOS[scenario]
    cfg = _cfg(nodes, instances, free_on_both(60, "node GPU counts test"))
    claimed: set[tuple[int, int]] = set()
    for node, count in enumerate(gpus):
        plan = _node_plan(monkeypatch, cfg, node, count)
        if plan.proxy_port is not None:
            claimed.add((node, plan.proxy_port))
        for instance in plan.local:
            spec = instance.spec
            assert spec.side_channel_port is not None
            claimed |= {(node, spec.port)} | ({(node, spec.master_port)} if spec.master_port is not None else set())
            ranks = _rank_nodes(instance.env, node, spec.tp)
            claimed |= {(node, spec.side_channel_port + r) for r, n in enumerate(ranks) if n == node}
        for rank in plan.remote_ranks:
            assert rank.spec.side_channel_port is not None
            claimed.add((node, rank.spec.side_channel_port + rank.rank))
    for batch_gpus in (0, 1, 8):  # salloc's shell on a login node, or the batch script on a node of its own size
        _sees(monkeypatch, batch_gpus)
        assert {(r.node, port) for r in port_plan(cfg) for port in range(r.first, r.last + 1)} == claimed


def test_a_node_seeing_fewer_gpus_than_planned_names_its_devices_field(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes, instances, _ = SCENARIOS["two nodes listing no devices"]
    cfg = _cfg(nodes, [*instances, {"role": "decode", "tp": 2, "node": 1}], 20000)
    with pytest.raises(PdlaunchError) as err:  # node 1 holds decode-0 and decode-1's two ranks: 3 GPUs
        _node_plan(monkeypatch, cfg, 1, 2)
    assert err.value.field == "parallel.nodes[1].devices"
    assert "node 1 (127.0.0.2) sees 2 GPU(s)" in err.value.message and "3 ranks on it" in err.value.message
    assert err.value.hint is not None and "devices: [0, 1]" in err.value.hint

    listed = _cfg([{"address": "127.0.0.1", "devices": [0, 1, 2, 3]}, nodes[1]], instances, 20000)
    with pytest.raises(PdlaunchError) as err:
        _node_plan(monkeypatch, listed, 0, 2)
    assert err.value.field == "parallel.nodes[0].devices" and "lists GPU 2" in err.value.message


def test_the_slurm_step_of_such_a_node_exits_1_naming_the_field(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Any) -> None:
    nodes, instances, _ = SCENARIOS["two nodes listing no devices"]
    cfg = _cfg(nodes, [*instances, {"role": "decode", "tp": 2, "node": 1}], 20000)
    cfg.launcher.backend = "slurm"
    cfg.log_dir = str(tmp_path)
    monkeypatch.setenv(DEPLOYMENT_ENV, cfg.model_dump_json())
    _sees(monkeypatch, 2)
    assert slurm_node.main(["--node-rank", "1"]) == 1
    err = capsys.readouterr().err
    # The step's own count, what the node's ranks need and the allocation that gives them (slurm_node.py)
    assert err.startswith("error: node 1: parallel.nodes[1]: node 1 (127.0.0.2) needs 3 GPU(s)"), err
    assert "its srun step sees 2" in err and "--gres=gpu:3" in err and "Traceback" not in err


def test_each_node_checks_its_own_gpus_and_the_slurm_batch_process_none(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes, instances, _ = SCENARIOS["two nodes listing no devices"]
    cfg = _cfg(nodes, instances, 20000)  # prefill TP 4 on node 0, decode TP 1 on node 1

    def gpu_fields(cfg: DeploymentConfig, gpus: int) -> list[str]:
        _sees(monkeypatch, gpus)
        problems, _ = validate_deployment(cfg, target=None)
        return [field for field, _ in problems if "devices" in field or field in ("device", "instances")]

    on = {k: cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"node_rank": k})}) for k in (0, 1)}
    assert gpu_fields(on[0], 4) == [] and gpu_fields(on[1], 1) == []  # each node checks itself only
    assert gpu_fields(on[0], 3) == ["parallel.nodes[0].devices"]
    batch = cfg.model_copy(update={"launcher": cfg.launcher.model_copy(update={"backend": "slurm"})})
    assert gpu_fields(batch, 1) == []  # node 0's four GPUs are its step's to check
    assert gpu_fields(batch, 0) == []  # salloc's shell on a login node: --device cuda is for the nodes
