"""What every TP rank builds the same way, in the same order: group, engine_id, model shard, KV cache.

The order matters: each step below runs collectives, and ranks must call them in lockstep.
  1. join the TP group            2. adopt rank 0's engine_id (vLLM #39907, before any connector)
  3. load this rank's shard and agree on the KV block count (minimum over ranks)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec, instance_cache
from pdlaunch.distributed.engine_id import sync_engine_id
from pdlaunch.distributed.parallel_state import SealedStore, TPGroup, connect_store, init_tp_group, store_key
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.model.checkpoint import Checkpoint
from pdlaunch.runner.model_runner import ModelRunner


@dataclass
class RankState:
    group: TPGroup
    engine_id: str
    runner: ModelRunner


def rank_device(device_type: str, instance: InstanceSpec | None, rank: int) -> torch.device:
    """Rank r's device: instance.devices[r] as this process sees them (CUDA), else the CPU."""
    if device_type != "cuda":
        return torch.device("cpu")
    if instance is not None and instance.devices:
        return torch.device("cuda", instance.devices[rank])
    return torch.device("cuda", rank)


def build_rank(rank: int, config: DeploymentConfig, instance: InstanceSpec | None, checkpoint: Checkpoint,
               device: torch.device, dtype: torch.dtype, max_model_len: int, master_port: int,
               store: SealedStore | None = None, key: bytes | None = None) -> RankState:
    """Steps 1-3 for `rank`. Rank 0 passes the store it hosts, a rank on another node its client; else this rank
    connects to rank 0's store sealed with `key` (a local worker: the key rank 0 handed it) or, without one, with
    the key every rank derives from the deployment secret (a Ray rank)."""
    tp = instance.tp if instance is not None else config.parallel.tp
    host = config.parallel.master_addr
    rendezvous_timeout_s = config.parallel.rendezvous_timeout_seconds
    if store is None:
        store = connect_store(host, master_port, key if key is not None else store_key(config, instance, master_port))
    group = init_tp_group(rank, tp, device, host, master_port, store, rendezvous_timeout_s)
    engine_id = sync_engine_id(config, group.cpu_group, instance)
    runner = ModelRunner(checkpoint, device, dtype, instance_cache(config, instance), config.scheduler, max_model_len,
                         tp_rank=rank, tp_size=tp, use_cumem=config.model.enable_cumem_allocator,
                         agree_num_blocks=group.min_int, after_load=group.loaded,
                         expert_parallel=(instance.expert_parallel if instance is not None
                                          else config.parallel.enable_expert_parallel),
                         role=instance.role if instance is not None else "colocated")
    return RankState(group=group, engine_id=engine_id, runner=runner)


def kv_cache_spec(checkpoint: Checkpoint, runner: ModelRunner) -> KVCacheSpec:
    """This rank's KV cache as its connector sees it (its KV-head slice, the shared block ids)."""
    arch = checkpoint.arch
    digest = hashlib.sha256(f"{arch.model_dump_json()}|{runner.dtype}".encode()).hexdigest()[:12]
    return KVCacheSpec(
        kv_caches=runner.kv_caches, num_blocks=runner.num_blocks, block_size=runner.block_size,
        num_kv_heads=runner.num_kv_heads, head_dim=runner.head_dim, dtype=runner.dtype,
        group_layers=[list(g.layers) for g in runner.groups],
        group_sliding_window=[g.sliding_window for g in runner.groups],
        model_name=f"{arch.architecture}-{digest}", tp_size=runner.tp_size, tp_rank=runner.tp_rank,
        kv_cache_dtype=runner.kv_dtype, kv_scales=runner.kv_scales_digest(), checkpoint_path=checkpoint.path,
        weights_version=runner.weights_version,
    )
