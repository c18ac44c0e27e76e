"""The Triton backend of fused_moe: two grouped GEMMs over assignments padded per expert, launched here.

The layout: few assignments for the experts (`few_assignments`) need none (the kernels read the routed ids);
up to 4096 assignments `align_rows` lays them out in two launches (align_kernels.py), above that the sort
(layout.align_to_blocks). The kernels (gemm_kernels.py): gate/up with SiLU-and-mul, then down weighted per row
into [T, k, H]; fp8 expert weights (W8A16) or fp8 activations too (W8A8, a tile entry's `fp8_activations`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pdlaunch.model.moe.align_kernels import align_rows, few_assignments
from pdlaunch.model.moe.gemm_kernels import gemm_kernels
from pdlaunch.model.moe.layout import TileConfig
from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs
from pdlaunch.model.triton_env import interpret_mode

SCALE_BLOCK = 128  # the block edge of fp8 expert weight scales (model/quant/config.py BLOCK)


def _quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], float32 scales [M, K/128]): one scale per row and 128 columns (the Triton
    kernel on CUDA, torch elsewhere: the interpreter)."""
    if x.is_cuda:
        from pdlaunch.model.quant.activations import quantize_rows

        return quantize_rows(x, SCALE_BLOCK)
    from pdlaunch.model.quant.fp8 import quantize_per_token_group

    return quantize_per_token_group(x, SCALE_BLOCK)


def _fitted(tile: TileConfig, x: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None) -> TileConfig:
    """`tile` with a k tile the operands allow: half as wide for float32 operands (the tile files are tuned for
    bf16; float32 takes twice the shared memory per stage), and no wider than a scale block with fp8 scales (a k
    tile must not straddle two)."""
    if x.element_size() > 2:
        tile = replace(tile, block_k=max(16, tile.block_k // 2))
    if scales is not None and SCALE_BLOCK % tile.block_k:
        tile = replace(tile, block_k=SCALE_BLOCK)
    return tile


def triton_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, topk_ids: torch.Tensor,
               expert_start: int, tile: TileConfig, scales: tuple[torch.Tensor, torch.Tensor] | None = None,
               num_experts: int | None = None, summed: bool = True) -> torch.Tensor:
    """fused_moe's Triton backend: weights float32 [T, k] and global ids [T, k] as routed; this rank holds
    experts [expert_start, + E_local) and the others' assignments get no row (their weights are never read).
    `scales`: w13 and w2 are fp8 with 128x128 block scales [E, 2I/128, H/128] and [E, H/128, I/128]
    (model/moe/experts.py); with `tile.fp8_activations` the activations are quantized too (W8A8, gemm_kernels.py's doc).
    `num_experts`: the model's expert count, when known: a rank holding all of them writes every assignment's
    row, so the rows need no zero fill first. `summed` False: the weighted rows [T, k, H] unsummed (the next
    RMSNorm's kernel adds them, fused_ops.fused_add_rms_norm), saving the sum's launch."""
    import triton

    a_fp8 = tile.fp8_activations and scales is not None
    sixteen_bit = x.dtype in (torch.bfloat16, torch.float16)
    f16 = tile.f16_products and scales is not None and not a_fp8 and sixteen_bit
    down_tile = _fitted(tile.down(), x, scales)
    tile = _fitted(tile, x, scales)
    s13, s2 = scales if scales is not None else (w13, w2)  # unread without scales (HAS_SCALE=False)
    scale_strides13 = s13.stride() if scales is not None else (0, 0, 0)
    scale_strides2 = s2.stride() if scales is not None else (0, 0, 0)
    num_tokens, top_k = topk_ids.shape
    num_local, two_inter, hidden = w13.shape
    inter = two_inter // 2
    num_rows = num_tokens * top_k
    direct = few_assignments(num_rows, num_local)
    if direct:  # a block per assignment, its expert read from the ids by the kernels themselves: no layout launch
        rows = block_expert = topk_ids.reshape(-1)
        num_blocks = num_rows
    else:
        rows, block_expert = align_rows(topk_ids, expert_start, num_local, tile.block_m)
        num_blocks = block_expert.shape[0]
    layout = dict(expert_start=expert_start, num_local=num_local, DIRECT=direct)
    k = gemm_kernels(interpret_mode())
    pdl = pdl_enabled(x, num_tokens)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    act = torch.empty(num_blocks * tile.block_m, inter, dtype=torch.float16 if f16 else x.dtype, device=x.device)
    a, a_scales = _quantize_groups(x) if a_fp8 else (x, x)  # the scales are unread without A_FP8
    k.up[(num_blocks, triton.cdiv(inter, tile.block_n))](
        a, a_scales, w13, s13, act, rows, block_expert, num_rows, top_k, hidden, inter,
        a.stride(0), a.stride(1), a_scales.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), *scale_strides13,
        act.stride(0), **layout, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        PRECISION=precision, HAS_SCALE=scales is not None, SCALE_BLOCK=SCALE_BLOCK, A_FP8=a_fp8,
        SWAP_AB=tile.swap_ab, MMA=k.mma, BLOCK_ROWS=k.block_rows, F16=f16, TO_F16=k.to_f16,
        PDL=pdl, **pdl_kwargs(pdl), num_warps=tile.num_warps,
        num_stages=tile.num_stages)
    every_row_written = expert_start == 0 and num_experts is not None and num_local >= num_experts
    out = (torch.empty if every_row_written else torch.zeros)(num_tokens * top_k, hidden, dtype=x.dtype,
                                                               device=x.device)
    a, a_scales = _quantize_groups(act) if a_fp8 else (act, act)
    k.down[(num_blocks, triton.cdiv(hidden, down_tile.block_n))](
        a, a_scales, w2, s2, out, rows, block_expert, weights.float().reshape(-1).contiguous(), num_rows,
        inter, hidden, a.stride(0), a_scales.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), *scale_strides2,
        out.stride(0), **layout, BLOCK_M=tile.block_m, BLOCK_N=down_tile.block_n, BLOCK_K=down_tile.block_k,
        PRECISION=precision, HAS_SCALE=scales is not None, SCALE_BLOCK=SCALE_BLOCK, A_FP8=a_fp8,
        SWAP_AB=down_tile.swap_ab, MMA=k.mma, BLOCK_ROWS=k.block_rows, F16=f16,
        PDL=pdl, **pdl_kwargs(pdl), num_warps=down_tile.num_warps,
        num_stages=down_tile.num_stages)
    # Rows of this layout are already in assignment order: the sum over k needs no unsort.
    rows_per_token = out.view(num_tokens, top_k, hidden)
    return rows_per_token.sum(dim=1) if summed else rows_per_token
