"""The attention metadata of a step run eagerly or piecewise (and of the runner's dry steps), from its host lists.

The decode graphs build theirs in static device buffers instead (cuda_graphs.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdlaunch.memory.platform import to_device_async
from pdlaunch.model.attention_metadata import AttentionMetadata


def step_metadata(query_lens: Sequence[int], context_lens: Sequence[int], slot_mapping: list[torch.Tensor],
                  block_tables: list[torch.Tensor], device: torch.device) -> AttentionMetadata:
    """Each tensor copied to `device` without a host sync; -1 table entries (blocks left a sliding window) read
    as block 0."""
    q = torch.tensor(query_lens, dtype=torch.long)
    ctx = torch.tensor(context_lens, dtype=torch.long)
    seq_lens = q + ctx
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.long)
    torch.cumsum(q, 0, out=qsl[1:])
    return AttentionMetadata(
        query_start_loc=to_device_async(qsl, device),
        seq_lens=to_device_async(seq_lens, device),
        context_lens=to_device_async(ctx, device),
        slot_mapping=[to_device_async(s, device) for s in slot_mapping],
        block_tables=[to_device_async(t.clamp(min=0), device) for t in block_tables],
        max_query_len=max(query_lens),
        max_seq_len=int(seq_lens.max()),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens.tolist(),
    )
