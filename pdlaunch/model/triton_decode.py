"""CUDA paged decode attention (Triton): one program per (decode sequence, KV head).

Each program walks only the blocks its query can see (the whole context, or the blocks that
overlap the sliding window), reading k/v straight from the block-major cache through the block
table, with an online softmax in float32. Correctness first: scores use broadcast products
rather than tl.dot so any block size and GQA group size work; tuning belongs to the
performance work. Only imported on CUDA (`paged_decode_available`).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def paged_decode_available(kv_cache: torch.Tensor) -> bool:
    """True when the Triton kernel serves this cache: CUDA, Triton installed, not forced off."""
    choice = os.environ.get("PDLAUNCH_PAGED_DECODE", "auto")
    if choice == "torch" or not kv_cache.is_cuda:
        return False
    head_dim, block_size = kv_cache.shape[-1], kv_cache.shape[3]
    pow2 = head_dim & (head_dim - 1) == 0 and block_size & (block_size - 1) == 0
    return pow2 and _triton_importable()


@lru_cache(maxsize=1)
def _kernel():  # noqa: ANN202 (a triton.JITFunction)
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode_kernel(
        q_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, tokens_ptr, out_ptr,
        scale, window, stride_qt, stride_qh, stride_bt, stride_ot, stride_oh,
        block_stride, k_offset, v_offset,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        token = tl.load(tokens_ptr + seq)
        qpos = tl.load(seq_lens_ptr + seq) - 1
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=(g < GROUP)[:, None], other=0.0).to(tl.float32)  # [G, D]
        first = tl.where(window > 0, tl.maximum(qpos - window + 1, 0), 0)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        offs = tl.arange(0, BLOCK_SIZE)
        for b in range(first // BLOCK_SIZE, qpos // BLOCK_SIZE + 1):
            block = tl.load(block_table_ptr + seq * stride_bt + b).to(tl.int64)
            kpos = b * BLOCK_SIZE + offs
            valid = (kpos <= qpos) & (kpos >= first)
            row = block * block_stride + offs[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + d[None, :]
            k = tl.load(cache_ptr + k_offset + row, mask=valid[:, None], other=0.0).to(tl.float32)  # [B, D]
            v = tl.load(cache_ptr + v_offset + row, mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, B]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = acc / denom[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])

    return paged_decode_kernel


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, layer_in_group: int, tokens: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, window: int | None,
                 scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; tokens/seq_lens: [Sd]; block_table: [Sd, max_blocks] -> [Sd, Hq, D]."""
    import triton

    num_blocks, layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty(tokens.shape[0], num_heads, head_dim, dtype=q.dtype, device=q.device)
    block_table = block_table.contiguous()
    plane = block_size * num_kv_heads * head_dim  # elements of one (layer, k|v) slice of a block
    _kernel()[(tokens.shape[0], num_kv_heads)](
        q, kv_cache, block_table, seq_lens, tokens, out,
        scale, window or 0, q.stride(0), q.stride(1), block_table.stride(0), out.stride(0), out.stride(1),
        layers * 2 * plane, (2 * layer_in_group) * plane, (2 * layer_in_group + 1) * plane,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
    )
    return out
