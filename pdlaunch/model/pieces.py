"""A step cut into pieces at every attention: what a piecewise CUDA graph replays (runner/mixed_graphs.py).

Attention over prompts reads host values (each prompt's length and context, the flash kernels' arguments), so a
step with prompt tokens cannot replay from one graph the way a uniform decode step does. Everything else in a
layer reads only device tensors of a fixed shape. The step is therefore cut at every attention:

    piece 0:      embed, rotary tables, layer 0's input norm and `Attention.project` (qkv, q/k norms, rotary,
                  the k/v cache write)
    attention 0   (eager: `Attention.attend`, the step's real sequences)
    piece i:      layer i-1's o_proj, post-attention norm and MLP / MoE block, layer i's input norm and project
    attention i
    ...
    piece L:      the last layer's o_proj and MLP, the final norm

Every piece reads and writes the static tensors of `PieceBuffers` at one padded token count, so it can be
captured once per count and replayed with new contents. The attention between pieces reads q/k/v from the
buffers and writes its output into `attn_out` for the next piece; rows past the step's tokens are padding
(token 0 at position 0, slot -1: nothing written to the cache), whose attention output is never written and
stays whatever finite values it held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PieceBuffers:
    """Static inputs and outputs of the pieces, `tokens` rows each (the largest padded count)."""

    input_ids: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long
    slots: list[torch.Tensor]  # per KV-cache group: [N] long, -1 = no write
    cos: torch.Tensor  # [N, D]: piece 0 writes the rotary tables every later piece reads
    sin: torch.Tensor  # [N, D]
    q: torch.Tensor  # [N, Hq, D]: a piece's projected, rotated queries
    k: torch.Tensor  # [N, Hkv, D]
    v: torch.Tensor  # [N, Hkv, D]
    attn_out: torch.Tensor  # [N, Hq, D]: the eager attention's output, the next piece's input
    residual: torch.Tensor  # [N, hidden]: the residual stream between pieces
    hidden: torch.Tensor  # [N, hidden]: the last piece's output (after the final norm)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def allocate(cls, inputs: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, hidden: int,
                 dtype: torch.dtype) -> PieceBuffers:
        """Buffers of N rows around `inputs` [2 + G, N] long: ids, positions, then the slots of each KV-cache
        group, one row each (the caller loads all of them with one copy)."""
        tokens, device = int(inputs.shape[1]), inputs.device

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            input_ids=inputs[0], positions=inputs[1], slots=list(inputs[2:].unbind(0)),
            cos=zeros(tokens, head_dim), sin=zeros(tokens, head_dim),
            q=zeros(tokens, num_heads, head_dim), k=zeros(tokens, num_kv_heads, head_dim),
            v=zeros(tokens, num_kv_heads, head_dim), attn_out=zeros(tokens, num_heads, head_dim),
            residual=zeros(tokens, hidden), hidden=zeros(tokens, hidden),
        )
