"""engine_id sync over a real gloo TP group of two CPU processes (vLLM #39907)."""

from __future__ import annotations

import datetime
import multiprocessing as mp
from typing import Any

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.distributed.engine_id import sync_engine_id
from tests.helpers.ports import free_port
from tests.kv_transfer.deployment_secret import secured


def _rank(rank: int, port: int, queue: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        config = secured(DeploymentConfig(kv_transfer=KVTransferConfig(engine_id=f"config-id-of-rank-{rank}")))
        instance = InstanceSpec(role="prefill", port=1, engine_id=f"instance-id-of-rank-{rank}")
        group = dist.new_group([0, 1])
        result = sync_engine_id(config, group=group, instance=instance)
        queue.put((rank, result, config.kv_transfer.engine_id, instance.engine_id))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # starts a TP group of processes
def test_rank0_engine_id_wins_on_every_rank() -> None:
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = sorted(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
    assert [p.exitcode for p in procs] == [0, 0]
    expected = "instance-id-of-rank-0"
    assert results == [(0, expected, expected, expected), (1, expected, expected, expected)]


def test_without_torch_distributed_it_is_a_no_op() -> None:
    config = secured(DeploymentConfig(kv_transfer=KVTransferConfig(engine_id="solo")))
    assert sync_engine_id(config) == "solo"
    assert config.kv_transfer.engine_id == "solo"
    instance = InstanceSpec(role="decode", port=1, engine_id="inst")
    assert sync_engine_id(config, instance=instance) == "inst"
    assert config.kv_transfer.engine_id == "inst" and instance.engine_id == "inst"
