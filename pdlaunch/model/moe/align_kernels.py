"""The per-expert padded layout of fused_moe's Triton backend at decode, in Triton launches.

`align_to_blocks` (model/moe/layout.py) lays the T*k assignments out in blocks of `block_m` rows, one
expert per block; blocks of expert -1 are unused and the kernels skip them. Up to 4096 assignments (decode)
`align_rows` computes the same layout in two launches of one program per 32-128 assignments (count, place): the
sort-based one is a dozen small kernels, ~100 us a layer on an H100 at batch 64. With few assignments for the
experts (`few_assignments`: batch 1 to 4 at 128 experts, top-8) every assignment has a block of its own, and the
kernels read that layout from the routed ids themselves (`DIRECT`): no launch at all.
Kernels are built lazily per interpret mode (see model/fused_ops.py for why), so the CPU tests run
them under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import torch

from pdlaunch.model.moe.layout import align_to_blocks, local_expert_ids
from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs
from pdlaunch.model.triton_env import interpret_mode


@lru_cache(maxsize=2)
def _kernels(interpret: bool) -> SimpleNamespace:
    import triton
    import triton.language as tl

    # layout.align_to_blocks's rows and block experts, the same values, in two launches of one program per chunk
    # of CHUNK assignments: count (and fill every row with the sentinel), then place.
    @triton.jit(do_not_specialize=["num_rows", "num_blocks"])
    def moe_align_count_kernel(ids_ptr, rows_ptr, block_expert_ptr, hist_ptr, num_rows, expert_start, num_local,
                               num_blocks, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
                               FEW: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # pdl.pdl_enabled: wait for the kernel before, then let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        chunk = tl.program_id(0)
        c = tl.arange(0, CHUNK)
        sentinel = tl.zeros((CHUNK,), dtype=tl.int64) + num_rows
        for p0 in range(chunk * CHUNK, num_blocks * BLOCK_M, tl.num_programs(0) * CHUNK):
            tl.store(rows_ptr + p0 + c, sentinel, mask=p0 + c < num_blocks * BLOCK_M)
        if FEW:  # a block per assignment, its row first; one program, so a barrier orders it after the sentinel
            tl.debug_barrier()
            for r0 in range(0, num_rows, CHUNK):
                r = r0 + c
                ok = r < num_rows
                ids = tl.load(ids_ptr + r, mask=ok, other=-1) - expert_start  # global -> local, others dropped
                ids = tl.where((ids >= 0) & (ids < num_local), ids, num_local)
                tl.store(rows_ptr + r.to(tl.int64) * BLOCK_M, r.to(tl.int64), mask=ok)
                tl.store(block_expert_ptr + r, tl.where(ids < num_local, ids, -1).to(tl.int32), mask=ok)
        else:
            r = chunk * CHUNK + c
            ids = tl.load(ids_ptr + r, mask=r < num_rows, other=-1) - expert_start
            ids = tl.where((ids >= 0) & (ids < num_local), ids, num_local)
            e = tl.arange(0, E_PAD)
            hot = (ids[:, None] == e[None, :]) & (e < num_local)[None, :]  # the dropped id matches no column
            tl.store(hist_ptr + chunk * E_PAD + e, tl.sum(hot.to(tl.int32), axis=0))

    @triton.jit(do_not_specialize=["num_rows", "num_blocks"])
    def moe_align_place_kernel(ids_ptr, rows_ptr, block_expert_ptr, hist_ptr, num_rows, expert_start, num_local,
                               num_blocks, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
                               CHUNKS_PAD: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # pdl.pdl_enabled: wait for the kernel before, then let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        chunk = tl.program_id(0)
        c = tl.arange(0, CHUNK)
        e = tl.arange(0, E_PAD)
        k = tl.arange(0, CHUNKS_PAD)
        hist = tl.load(hist_ptr + k[:, None] * E_PAD + e[None, :], mask=(k < tl.num_programs(0))[:, None], other=0)
        padded = (tl.sum(hist, axis=0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        padded_end = tl.cumsum(padded, 0)
        padded_start = padded_end - padded
        earlier = tl.sum(tl.where((k < chunk)[:, None], hist, 0), axis=0)  # each expert's rows in earlier chunks
        # Rank of a row among its expert's rows in this chunk = same-expert rows before it (stable, as the sort):
        # strictly-lower-triangular ones @ one-hot rows, a tensor-core product exact with fp16 inputs.
        r = chunk * CHUNK + c
        ok = r < num_rows
        ids = tl.load(ids_ptr + r, mask=ok, other=-1) - expert_start  # global ids -> this rank's, others dropped
        ids = tl.where((ids >= 0) & (ids < num_local), ids, num_local)
        hot = (ids[:, None] == e[None, :]) & (e < num_local)[None, :]
        before = tl.dot((c[:, None] > c[None, :]).to(tl.float16), hot.to(tl.float16)).to(tl.int32)
        dest = tl.sum(tl.where(hot, before + (earlier + padded_start)[None, :], 0), axis=1)
        tl.store(rows_ptr + dest, r.to(tl.int64), mask=ok & (ids < num_local))
        # The blocks' experts, CHUNK blocks a program in turn (program 0 doing all of them was the launch's tail).
        for b0 in range(chunk * CHUNK, num_blocks, tl.num_programs(0) * CHUNK):
            b = b0 + c
            ended = (padded_end[None, :] <= (b * BLOCK_M)[:, None]) & (e < num_local)[None, :]
            expert = tl.sum(ended.to(tl.int32), axis=1)  # searchsorted(padded_end, block start, right)
            tl.store(block_expert_ptr + b, tl.where(expert < num_local, expert, -1), mask=b < num_blocks)

    return SimpleNamespace(align_count=moe_align_count_kernel, align_place=moe_align_place_kernel)


ALIGN_KERNEL_MAX_ROWS = 4096  # above (prefill), the sort-based layout.align_to_blocks is as fast


def few_assignments(num_rows: int, num_local: int) -> bool:
    """Few assignments for the experts (a quarter of them or fewer: batch 1 to 4 at 128 experts, top-8): each gets
    a block of its own, the layout the kernels read straight from the routed ids (`DIRECT`), with no layout launch
    between the router and the up GEMM (batch 1 of a 48-layer model: 48 launches a step, each a wait for the
    kernel before)."""
    return num_rows * 4 <= num_local


def align_rows(topk_ids: torch.Tensor, expert_start: int, num_local: int, block_m: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """layout.align_to_blocks's (rows, block_expert) for this rank's experts [expert_start, + num_local) of the
    global `topk_ids`, equal values: up to ALIGN_KERNEL_MAX_ROWS assignments in two Triton launches of one
    program per 32-128 assignments, which also map the ids to local ones (decode: the sort and its dozen small
    kernels cost ~100 us a layer on an H100 at batch 64, half the fp8 up GEMM's time), the sort above."""
    import triton

    num_rows = topk_ids.numel()
    if num_rows > ALIGN_KERNEL_MAX_ROWS:
        return align_to_blocks(local_expert_ids(topk_ids, expert_start, num_local), num_local, block_m)
    few = few_assignments(num_rows, num_local)
    num_blocks = num_rows if few else -(-num_rows // block_m) + min(num_local, num_rows)
    device = topk_ids.device
    rows = torch.empty(num_blocks * block_m, dtype=torch.int64, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    e_pad = max(16, triton.next_power_of_2(num_local))  # 16: the smallest tensor-core product
    # 32 assignments a program up to 2048 (batch 256 at top-8): on an H200 at batch 64, 128 experts, the two
    # launches took 8.3 us against 12.0 with 128 (benchmarks/RESULTS.md); more programs, each a shorter chain.
    chunk = 32 if num_rows <= 2048 else 128 if e_pad <= 128 else 64
    chunks = triton.cdiv(num_rows, chunk)
    hist = torch.empty(chunks, e_pad, dtype=torch.int32, device=device)  # expert counts per chunk
    k = _kernels(interpret_mode())
    args = (topk_ids.reshape(-1), rows, block_expert, hist, num_rows, expert_start, num_local, num_blocks)
    pdl = pdl_enabled(topk_ids, topk_ids.shape[0])
    k.align_count[(1 if few else chunks,)](*args, BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk, FEW=few, PDL=pdl,
                                           **pdl_kwargs(pdl), num_warps=4)
    if not few:
        k.align_place[(chunks,)](*args, BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk,
                                 CHUNKS_PAD=max(16, triton.next_power_of_2(chunks)), PDL=pdl, **pdl_kwargs(pdl),
                                 num_warps=4)
    return rows, block_expert
