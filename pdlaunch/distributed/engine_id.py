"""engine_id sync across a TP group (vLLM #39907, docs/ARCHITECTURE.md "Upstream behaviours we reproduce").

Each process of an instance may have drawn its own default engine_id (a fresh uuid), and ranks on
other nodes certainly did. The handshake names the prefill engine by one id, so before the KV
connector exists TP rank 0 broadcasts its engine_id over the TP group and every rank adopts it.
The TP group, not the world group: the id belongs to the instance, and an instance is one TP group.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec

logger = logging.getLogger(__name__)


def sync_engine_id(
    config: DeploymentConfig, group: Any = None, instance: InstanceSpec | None = None
) -> str:
    """Adopt TP rank 0's engine_id on every rank of `group` (default: the whole world); returns it.

    The id broadcast is `instance.engine_id` when an instance spec is given (that is what the
    connector uses), else `config.kv_transfer.engine_id`; both are written back. A no-op when
    torch.distributed is not initialised or the group has one rank.
    """
    engine_id = instance.engine_id if instance is not None else config.kv_transfer.engine_id
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        box: list[Any] = [engine_id]
        # src is a global rank: the group's rank 0.
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(box, src=src, group=group)
        if box[0] != engine_id:
            logger.info("engine_id %s replaced by TP rank 0's %s", engine_id, box[0])
        engine_id = str(box[0])
    config.kv_transfer.engine_id = engine_id
    if instance is not None:
        instance.engine_id = engine_id
    return engine_id
