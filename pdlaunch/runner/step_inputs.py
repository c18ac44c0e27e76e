"""One step's batch as the model runner feeds it to the model (and rank 0 sends it to the other TP ranks).

Its own module so that the CUDA-graph replay (cuda_graphs.py) and the runner (model_runner.py) both
depend on it instead of on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdlaunch.memory.platform import to_device_async


@dataclass
class StepInputs:
    """One step's batch on the host; identical for every TP rank (rank 0 builds it, sends it on)."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    query_lens: list[int]  # per scheduled request
    context_lens: list[int]  # tokens already in the cache, per scheduled request
    slot_mapping: list[torch.Tensor]  # per KV-cache group, [T] long
    block_tables: list[torch.Tensor]  # per KV-cache group, [N, max_blocks] long, -1 padded
    sample_rows: list[int]  # token rows whose logits are returned, in order
    # Rows whose logits give prompt logprobs (engine/prompt_logprobs.py), with the tokens they predict.
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    prompt_top_k: int = 0
    # Async scheduling (engine/async_step.py): token rows whose id was sampled by the step still in flight;
    # input_ids[pending_rows[i]] = pending_source[pending_src[i]], on the device (TP 1 only: never sent).
    pending_rows: list[int] = field(default_factory=list)
    pending_src: list[int] = field(default_factory=list)
    pending_source: torch.Tensor | None = None  # [M] long on the device

    def fill_pending(self, input_ids: torch.Tensor) -> None:
        """Write the in-flight step's sampled ids into `input_ids` (a device copy of `self.input_ids`)."""
        if self.pending_rows and self.pending_source is not None:
            dev = input_ids.device
            rows = to_device_async(torch.tensor(self.pending_rows, dtype=torch.long), dev)
            src = to_device_async(torch.tensor(self.pending_src, dtype=torch.long), dev)
            input_ids.index_copy_(0, rows, self.pending_source.index_select(0, src))
