"""The Triton backend of fused_moe: two grouped GEMMs over assignments padded per expert.

`align_to_blocks` (model/moe/layout.py) lays the T*k assignments out in blocks of `block_m` rows, one
expert per block; blocks of expert -1 are unused and the kernels skip them. Up to 4096 assignments (decode)
`align_rows` computes the same layout in two launches of one program per 32-128 assignments (count, place): the
sort-based one is a dozen small kernels, ~100 us a layer on an H100 at batch 64. With few assignments for the
experts (`few_assignments`: batch 1 to 4 at 128 experts, top-8) every assignment has a block of its own, and the
kernels read that layout from the routed ids themselves (`DIRECT`): no launch at all.

- `moe_up_kernel`: per (block, column tile) x[token rows] @ w13[e]^T for the gate and the up halves
  at once, SiLU-and-mul in the epilogue -> [padded rows, I].
- `moe_down_kernel`: per (block, column tile) that @ w2[e]^T, times each row's routing weight, written
  to the assignment's own row of [M, H] (token-major), so one sum over a [T, k, H] view combines.
Rounding follows the eager reference: each GEMM result is rounded to the dtype before SiLU/the product.
FP8 experts (W8A16): with block scales each kernel loads an fp8 weight tile (half the bytes) and turns it
into the activation dtype in registers, value x its 128x128 block's scale, exactly the weight
`dequantize_stacked_blocks(...).to(dtype)` gives, so the result equals the same kernel on the
dequantized bf16 weights; the matmul itself runs in bf16 (decode is weight-read bound, which this halves).
(Scaling the bf16 product of the unscaled tile instead, one multiply per output, measured slower on an
H200: 0.86x against 0.79x of the bf16 decode step at batch 64, and 240 against 198 ms at 8k prefill.)
FP8 activations (W8A8, a tile entry's `fp8_activations`): x and the SiLU-and-mul product are quantized per
row and 128 columns (quant/kernels.py quantize_rows) and each k block's fp8 x fp8 product is scaled by its
row's and its column's scale. From 64-row tiles up the products are fp8 warpgroup MMAs; below (decode),
Triton turns both fp8 tiles into f16 with one conversion per two elements, which is all the weights cost in
registers. The activations' rounding to 3 mantissa bits costs about 3% relative error against the float32
loop; benchmarks/moe_kernels.py --fp8 times both modes per size and the tile file keeps the faster.
Swapped operands (a tile's `swap_ab`): weight tile^T @ rows^T, so at decode the weight tile is the warpgroup
MMA's 64-row side and a block's 16 rows its n (wgmma instead of mma.sync; measured within 1% either way).
Kernels are built lazily per interpret mode (see model/fused_ops.py for why), so the CPU tests run
them under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from types import SimpleNamespace

import torch

from pdlaunch.model.moe.layout import TileConfig, align_to_blocks, local_expert_ids
from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs
from pdlaunch.model.triton_env import interpret_mode

SCALE_BLOCK = 128  # the block edge of fp8 expert weight scales (model/quant/config.py BLOCK)


@lru_cache(maxsize=2)
def _kernels(interpret: bool) -> SimpleNamespace:
    import triton
    import triton.language as tl

    # Handed to the kernels as MMA (a constexpr): Triton's interpreter resolves callees among module globals only
    # (model/fused_ops.py's ROTATE).
    @triton.jit
    def mma(acc, a, b, s_a, s_b, A_FP8: tl.constexpr, SWAP_AB: tl.constexpr, PRECISION: tl.constexpr,
            B_SCALED: tl.constexpr):
        """acc + a @ b for a [M, K] and b [K, N] tiles; with SWAP_AB, acc and the result are [N, M] (b^T @ a^T:
        the weight tile is the MMA's long side). A_FP8: fp8 x fp8, scaled per row (s_a) and column (s_b).
        B_SCALED (F16): the product scaled per column (s_b) only."""
        if SWAP_AB:
            if A_FP8:
                acc += tl.dot(tl.trans(b), tl.trans(a)) * s_b[:, None] * s_a[None, :]
            elif B_SCALED:
                acc += tl.dot(tl.trans(b), tl.trans(a)) * s_b[:, None]
            else:
                acc = tl.dot(tl.trans(b), tl.trans(a), acc, input_precision=PRECISION)
        else:
            if A_FP8:
                acc += tl.dot(a, b) * s_a[:, None] * s_b[None, :]
            elif B_SCALED:
                acc += tl.dot(a, b) * s_b[None, :]
            else:
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def to_f16(v):
        """v rounded to float16, values past its range to +-65504 (never inf)."""
        return tl.minimum(tl.maximum(v.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    @triton.jit
    def block_rows(rows_ptr, block_expert_ptr, pid_m, num_rows, expert_start, num_local, BLOCK_M: tl.constexpr,
                   DIRECT: tl.constexpr):
        """Block pid_m's local expert (-1: none here) and its BLOCK_M assignment rows (num_rows: padding). DIRECT:
        a block per assignment, read from the routed global ids themselves (block_expert_ptr), the layout
        align_rows's FEW case writes; else the layout align_rows wrote."""
        m = tl.arange(0, BLOCK_M)
        if DIRECT:
            e = tl.load(block_expert_ptr + pid_m) - expert_start
            e = tl.where((e >= 0) & (e < num_local), e, -1).to(tl.int64)
            rows = tl.where(m == 0, pid_m, num_rows).to(tl.int64)
        else:
            e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
            rows = tl.load(rows_ptr + pid_m.to(tl.int64) * BLOCK_M + m)
        return e, rows

    # Token counts are not specialized on (divisible by 16, equal to 1): one compiled variant per tile serves
    # every batch, so a step of a new size never waits for a compile while serving.
    @triton.jit(do_not_specialize=["num_rows"])
    def moe_up_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, out_ptr, rows_ptr, block_expert_ptr, num_rows, top_k, K, N,
                      sx_t, sx_k, sxs_t, sw_e, sw_n, sw_k, ss_e, ss_n, ss_k, so_m, expert_start, num_local,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PRECISION: tl.constexpr, HAS_SCALE: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                      A_FP8: tl.constexpr, SWAP_AB: tl.constexpr, MMA: tl.constexpr, PDL: tl.constexpr,
                      DIRECT: tl.constexpr, BLOCK_ROWS: tl.constexpr, F16: tl.constexpr, TO_F16: tl.constexpr):
        if PDL:  # triton_decode.pdl_enabled: wait for the kernel before; the next one starts as these
            tl.extra.cuda.gdc_wait()  # programs end (a big grid: started early, it would share the SMs)
        pid_m = tl.program_id(0)
        e, rows = BLOCK_ROWS(rows_ptr, block_expert_ptr, pid_m, num_rows, expert_start, num_local, BLOCK_M, DIRECT)
        if e < 0:
            return
        dtype = out_ptr.dtype.element_ty  # float16 with F16
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        token = rows // top_k
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        if SWAP_AB:
            acc_gate = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_base = w_ptr + e * sw_e
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a = tl.load(x_ptr + token[:, None] * sx_t + offs_k[None, :] * sx_k,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b_mask = k_ok[:, None] & n_ok[None, :]
            b_gate = tl.load(w_base + offs_n[None, :] * sw_n + offs_k[:, None] * sw_k, mask=b_mask, other=0.0)
            b_up = tl.load(w_base + (offs_n[None, :] + N) * sw_n + offs_k[:, None] * sw_k, mask=b_mask, other=0.0)
            s_gate = n_ok  # unread without scales
            s_up = n_ok
            if HAS_SCALE:
                s_base = s_ptr + e * ss_e + (k0 // SCALE_BLOCK) * ss_k
                s_gate = tl.load(s_base + (offs_n // SCALE_BLOCK) * ss_n, mask=n_ok, other=0.0)
                s_up = tl.load(s_base + ((offs_n + N) // SCALE_BLOCK) * ss_n, mask=n_ok, other=0.0)
            s_a = n_ok  # unread unless A_FP8
            if A_FP8:  # fp8 x fp8 products, each 128-wide k block scaled by its row's and its column's scale
                s_a = tl.load(xs_ptr + token * sxs_t + k0 // SCALE_BLOCK, mask=row_ok, other=0.0)
            elif F16:  # float16 x the fp8 tile widened to float16 (exact), the product scaled per column
                a = TO_F16(a)
                b_gate = b_gate.to(tl.float16)
                b_up = b_up.to(tl.float16)
            elif HAS_SCALE:  # fp8 weight tile -> the model dtype, one scale per (128 rows, 128 columns) block
                b_gate = (b_gate.to(tl.float32) * s_gate[None, :]).to(dtype)
                b_up = (b_up.to(tl.float32) * s_up[None, :]).to(dtype)
            acc_gate = MMA(acc_gate, a, b_gate, s_a, s_gate, A_FP8, SWAP_AB, PRECISION, F16)
            acc_up = MMA(acc_up, a, b_up, s_a, s_up, A_FP8, SWAP_AB, PRECISION, F16)
        if SWAP_AB:
            acc_gate = tl.trans(acc_gate)
            acc_up = tl.trans(acc_up)
        if F16:  # each result rounded to float16 (clamped into its range), as the other modes round to dtype
            gate = TO_F16(acc_gate).to(tl.float32)
            up = TO_F16(acc_up).to(tl.float32)
            act = TO_F16(gate / (1.0 + tl.exp(-gate))).to(tl.float32)
            product = TO_F16(act * up)
        else:
            gate = acc_gate.to(dtype).to(tl.float32)
            up = acc_up.to(dtype).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            product = (act * up).to(dtype)
        tl.store(out_ptr + offs_m[:, None] * so_m + offs_n[None, :], product, mask=n_ok[None, :])

    @triton.jit(do_not_specialize=["num_rows"])
    def moe_down_kernel(a_ptr, as_ptr, w_ptr, s_ptr, out_ptr, rows_ptr, block_expert_ptr, weight_ptr, num_rows, K,
                        N, sa_m, sas_m, sw_e, sw_n, sw_k, ss_e, ss_n, ss_k, so_m, expert_start, num_local,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr, HAS_SCALE: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                        A_FP8: tl.constexpr, SWAP_AB: tl.constexpr, MMA: tl.constexpr, PDL: tl.constexpr,
                        DIRECT: tl.constexpr, BLOCK_ROWS: tl.constexpr, F16: tl.constexpr):
        if PDL:  # triton_decode.pdl_enabled: wait for the kernel before; the next one starts as these
            tl.extra.cuda.gdc_wait()  # programs end (a big grid: started early, it would share the SMs)
        pid_m = tl.program_id(0)
        e, rows = BLOCK_ROWS(rows_ptr, block_expert_ptr, pid_m, num_rows, expert_start, num_local, BLOCK_M, DIRECT)
        if e < 0:
            return
        dtype = out_ptr.dtype.element_ty
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_base = w_ptr + e * sw_e
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None] * sa_m + offs_k[None, :], mask=k_ok[None, :], other=0.0)
            b = tl.load(w_base + offs_n[None, :] * sw_n + offs_k[:, None] * sw_k,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            s_w = n_ok  # unread without scales
            if HAS_SCALE:
                s_w = tl.load(s_ptr + e * ss_e + (k0 // SCALE_BLOCK) * ss_k + (offs_n // SCALE_BLOCK) * ss_n,
                              mask=n_ok, other=0.0)
            s_a = n_ok  # unread unless A_FP8
            if A_FP8:
                s_a = tl.load(as_ptr + offs_m * sas_m + k0 // SCALE_BLOCK)
            elif F16:  # a is the up kernel's float16 output
                b = b.to(tl.float16)
            elif HAS_SCALE:
                b = (b.to(tl.float32) * s_w[None, :]).to(dtype)
            acc = MMA(acc, a, b, s_a, s_w, A_FP8, SWAP_AB, PRECISION, F16)
        if SWAP_AB:
            acc = tl.trans(acc)
        weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
        out = acc.to(dtype).to(tl.float32) * weight[:, None]
        tl.store(out_ptr + rows[:, None] * so_m + offs_n[None, :], out.to(dtype), mask=row_ok[:, None] & n_ok[None, :])

    # layout.align_to_blocks's rows and block experts, the same values, in two launches of one program per chunk
    # of CHUNK assignments: count (and fill every row with the sentinel), then place.
    @triton.jit(do_not_specialize=["num_rows", "num_blocks"])
    def moe_align_count_kernel(ids_ptr, rows_ptr, block_expert_ptr, hist_ptr, num_rows, expert_start, num_local,
                               num_blocks, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
                               FEW: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # triton_decode.pdl_enabled: wait for the kernel before, then let the next one start
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
        if PDL:  # triton_decode.pdl_enabled: wait for the kernel before, then let the next one start
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

    return SimpleNamespace(up=moe_up_kernel, down=moe_down_kernel, mma=mma, block_rows=block_rows, to_f16=to_f16,
                           align_count=moe_align_count_kernel,
                           align_place=moe_align_place_kernel)


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


def _quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], float32 scales [M, K/128]): one scale per row and 128 columns (the Triton
    kernel on CUDA, torch elsewhere: the interpreter)."""
    if x.is_cuda:
        from pdlaunch.model.quant.kernels import quantize_rows

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
    (model/moe/experts.py); with `tile.fp8_activations` the activations are quantized too (W8A8, module doc).
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
    k = _kernels(interpret_mode())
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
