"""A parameter's own `weight_loader`: how a checkpoint tensor fills it (tensor-parallel sharding at load).

A weight loader receives the full checkpoint tensor and copies this rank's shard into the parameter in place:
column-parallel layers split the output dim, row-parallel ones the input dim (parallel_linear.py),
vocab-parallel ones the vocabulary (vocab_parallel.py). At tp_size=1 every loader is a plain copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Which part of a parameter a checkpoint tensor fills: None (the whole), a merged projection's index,
# "q" / "k" / "v" (QKVParallelLinear), or an MoE expert's (half, expert) / expert (model/moe/names.py).
ShardId = str | int | tuple[str, int] | None


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(loaded.shape)}, model {tuple(param.shape)}")
    param.data.copy_(loaded)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
    copy_checked(param, loaded, "parameter")


def set_loader(param: nn.Parameter, loader: Callable[..., None]) -> None:
    param.weight_loader = loader  # type: ignore[attr-defined]
