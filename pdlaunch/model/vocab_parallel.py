"""The embedding table and the LM head, each split along the vocabulary over the tensor-parallel group: ids
outside a rank's range embed as 0 and the ranks' rows are all-reduced; the head's logits are gathered to full width.
Both talk to the other ranks only when tp_size > 1 (a torch.distributed group must then exist).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pdlaunch.model.gemv import gemv, gemv_available
from pdlaunch.model.weight_loader import ShardId, set_loader


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary; ids outside this rank's range contribute 0."""

    def __init__(self, vocab_size: int, hidden: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.vocab_size = vocab_size
        self.shard_size = math.ceil(vocab_size / tp_size)
        self.vocab_start = tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden), requires_grad=False)
        set_loader(self.weight, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if loaded.shape[1] != param.shape[1]:
            raise ValueError(f"embedding width mismatch: checkpoint {loaded.shape[1]}, model {param.shape[1]}")
        # A table of another height than vocab_size would load (padded with zeros, or cut) and serve ids whose rows
        # are not the model's: refused, as transformers and vLLM refuse it.
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(f"it has {loaded.shape[0]} vocabulary rows but config.json's vocab_size is "
                             f"{self.vocab_size}")
        rows = max(0, min(self.shard_size, loaded.shape[0] - self.vocab_start))
        # A rank whose share lies wholly past the vocabulary (a small one over a large TP: 10 ids over 8 ranks of 2)
        # holds padding only; narrow refuses a start past the table even for no rows.
        param.data[:rows].copy_(loaded.narrow(0, min(self.vocab_start, loaded.shape[0]), rows))
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        in_range = (local >= 0) & (local < self.shard_size)
        out = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * in_range.unsqueeze(-1)
        dist.all_reduce(out)
        return out


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection split along the vocabulary; logits are gathered to full width."""

    def __init__(self, vocab_size: int, hidden: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(vocab_size, hidden, tp_rank, tp_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        logits = self._float32_logits(hidden)  # [N, vocab / tp]
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.vocab_size]

    def _float32_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """On CUDA the product is written as float32 by the kernel that sums it: one row through the GEMV, as the
        projections, more rows through cuBLAS's `mm` with a float32 output (where torch has it). That skips
        rounding the logits to bf16 and the launch that widened them again (H200, Llama-3-8B head: 19 us at 64
        rows, 41 at 128, 79 at 256; benchmarks/RESULTS.md, "Two leads for the batched cells"). Elsewhere: the
        product, then float32."""
        if gemv_available(hidden, self.weight):
            return gemv(hidden, self.weight, out_dtype=torch.float32)
        if (hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) and self.weight.dtype == hidden.dtype
                and _mm_writes_float32()):
            return torch.mm(hidden.reshape(-1, hidden.shape[-1]), self.weight.t(), out_dtype=torch.float32
                            ).reshape(*hidden.shape[:-1], -1)
        return F.linear(hidden, self.weight).float()


@lru_cache(maxsize=1)
def _mm_writes_float32() -> bool:
    """torch has `mm(a, b, out_dtype=...)` (aten::mm.dtype, torch 2.8 and newer); before, the head's logits are
    the product in its dtype, then float32."""
    return hasattr(torch.ops.aten.mm, "dtype")
