"""What one forward step tells the attention layers. Built by runner/model_runner.py.

A step runs T tokens of S sequences, flattened: sequence i owns tokens
query_start_loc[i] : query_start_loc[i+1]. Its context before this step is context_lens[i]
tokens (already in the KV cache); after the step it is seq_lens[i] = context_lens[i] + query_len.

KV cache layout (one tensor per KV-cache group g, block-major so one block of all layers is one
contiguous byte range and consecutive blocks coalesce into MiB-sized NIXL descriptors):

    kv_caches[g]: [num_blocks, num_layers_in_group, 2 (k, v), block_size, num_kv_heads, head_dim]

Token at position p of a sequence lives in block block_tables[g][i, p // block_size] at offset
p % block_size; slot_mapping[g][t] = block_id * block_size + offset of token t, or -1 to skip
the write. A block table entry of -1 (padded to 0 in the tensor) means "not held" (left a
sliding window); such positions are masked and never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [S+1] int64, on the model device
    seq_lens: torch.Tensor  # [S] int64
    context_lens: torch.Tensor  # [S] int64
    slot_mapping: list[torch.Tensor]  # per group: [T] int64
    block_tables: list[torch.Tensor]  # per group: [S, max_blocks] int32/int64, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies for loops and kernel choice (avoid device syncs in the hot path).
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Every sequence has query length 1 and the tensors above are all the plan may read: no host
    # values, no host syncs (a CUDA graph replays it with new contents). seq_lens_cpu is then
    # only an upper bound. Set by runner/cuda_graphs.py.
    uniform_decode: bool = False
    # With uniform_decode, where a prompt's tokens run as rows (runner/cuda_graphs.py): [S] each row's lead row,
    # whose paged-decode program computes it with the rows after it of the same prompt (model/triton_decode.py).
    row_leads: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
