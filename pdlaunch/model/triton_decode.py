"""CUDA paged decode attention (Triton): programs per (decode sequence, KV head, context split).

Each program walks its share of the blocks its query can see (the whole context, or the blocks
that overlap the sliding window), reading k/v straight from the block-major cache through the
block table, with an online softmax in float32. Scores use broadcast products rather than tl.dot
so any block size and GQA group size work.

Few sequences give few programs (batch 1 of an 8-KV-head model: 8), each walking the context
serially: 57 us per layer at 256 tokens on an H100, a fifth of the decode step. So the visible
blocks are split into `SPLITS` contiguous ranges (enough programs to fill the SMs twice, at most
32); each writes its partial (max, sum, weighted values) and a second kernel merges them. The
split count depends only on the batch and head counts, so a CUDA graph replays it for any context.
Only imported on CUDA (`paged_decode_available`).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def triton_importable() -> bool:
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
    return pow2 and triton_importable()


@lru_cache(maxsize=1)
def _kernel():  # noqa: ANN202 (a triton.JITFunction)
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode_kernel(
        q_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, tokens_ptr, out_ptr, part_ptr,
        scale, window, stride_qt, stride_qh, stride_bt, stride_ot, stride_oh,
        block_stride, k_offset, v_offset,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
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
        first_block = first // BLOCK_SIZE
        num_visible = qpos // BLOCK_SIZE + 1 - first_block
        per_split = (num_visible + SPLITS - 1) // SPLITS
        start = first_block + split * per_split
        stop = tl.minimum(start + per_split, qpos // BLOCK_SIZE + 1)
        for b in range(start, stop):
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
        if SPLITS == 1:
            out = acc / denom[:, None]
            tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])
        else:
            # part: [Sd, Hq, SPLITS, HEAD_DIM + 2] float32 = (weighted values, max, sum) per split.
            row = ((seq * NUM_KV_HEADS * GROUP + heads) * SPLITS + split) * (HEAD_DIM + 2)  # [G]
            valid = (g < GROUP)
            tl.store(part_ptr + row[:, None] + d[None, :], acc, mask=valid[:, None])
            tl.store(part_ptr + row + HEAD_DIM, m, mask=valid)
            tl.store(part_ptr + row + HEAD_DIM + 1, denom, mask=valid)

    @triton.jit
    def merge_splits_kernel(part_ptr, out_ptr, num_heads, stride_ot, stride_oh,
                            SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        sp = tl.arange(0, SPLITS)
        d = tl.arange(0, HEAD_DIM)
        base = ((seq * num_heads + head) * SPLITS + sp) * (HEAD_DIM + 2)  # [S]
        m = tl.load(part_ptr + base + HEAD_DIM)
        denom = tl.load(part_ptr + base + HEAD_DIM + 1)
        acc = tl.load(part_ptr + base[:, None] + d[None, :])  # [S, D]
        m_all = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)  # empty splits weigh nothing
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(denom * w, axis=0)
        tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))

    return paged_decode_kernel, merge_splits_kernel


@lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(num_seqs: int, num_kv_heads: int, device_index: int) -> int:
    """Context splits per (sequence, KV head): enough programs for two waves over the SMs, <= 32."""
    programs = max(1, num_seqs * num_kv_heads)
    wanted = -(-2 * _num_sms(device_index) // programs)
    return min(32, 1 << (wanted - 1).bit_length()) if wanted > 1 else 1


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, layer_in_group: int, tokens: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, window: int | None,
                 scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; tokens/seq_lens: [Sd]; block_table: [Sd, max_blocks] -> [Sd, Hq, D]."""
    import triton

    num_blocks, layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    num_seqs = tokens.shape[0]
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    block_table = block_table.contiguous()
    plane = block_size * num_kv_heads * head_dim  # elements of one (layer, k|v) slice of a block
    splits = num_splits(num_seqs, num_kv_heads, q.device.index or 0)
    part = (torch.empty(num_seqs, num_heads, splits, head_dim + 2, dtype=torch.float32, device=q.device)
            if splits > 1 else out)
    decode_kernel, merge_kernel = _kernel()
    decode_kernel[(num_seqs, num_kv_heads, splits)](
        q, kv_cache, block_table, seq_lens, tokens, out, part,
        scale, window or 0, q.stride(0), q.stride(1), block_table.stride(0), out.stride(0), out.stride(1),
        layers * 2 * plane, (2 * layer_in_group) * plane, (2 * layer_in_group + 1) * plane,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, SPLITS=splits,
    )
    if splits > 1:
        merge_kernel[(num_seqs, num_heads)](part, out, num_heads, out.stride(0), out.stride(1),
                                            SPLITS=splits, HEAD_DIM=head_dim)
    return out
