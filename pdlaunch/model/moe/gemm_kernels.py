"""The two grouped GEMM kernels of fused_moe's Triton backend, over the T*k assignments laid out in blocks of
`block_m` rows, one expert per block (align_kernels.py); blocks of expert -1 are unused and the kernels skip them.
With a block per assignment (`DIRECT`) they read each block's expert from the routed ids themselves.

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
row and 128 columns (quant/activations.py quantize_rows) and each k block's fp8 x fp8 product is scaled by its
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

from functools import lru_cache
from types import SimpleNamespace


@lru_cache(maxsize=2)
def gemm_kernels(interpret: bool) -> SimpleNamespace:
    """The up and down kernels, and the jit helpers they take as constexprs."""
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
        if PDL:  # pdl.pdl_enabled: wait for the kernel before; the next one starts as these
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
        if PDL:  # pdl.pdl_enabled: wait for the kernel before; the next one starts as these
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

    return SimpleNamespace(up=moe_up_kernel, down=moe_down_kernel, mma=mma, block_rows=block_rows, to_f16=to_f16)
