"""Triton kernels for FP8 linear layers on the GPU: dynamic activation quantization (per token, or per
token and 128-column group) and the block-scaled GEMM of 128x128-block FP8 weights.

y[m, n] = sum over k blocks kb of (sum_k a[m, k] w[n, k]) * a_scale[m, kb] * w_scale[n // 128, kb]:
each K step is one 128-column block, so the two scales of a partial product are one value per row of
the tile (activations) and one per tile (weights, the N tile lies inside one 128-row block).
From a decode batch of 65 rows up (17 for gate_up-sized weights), on sm_90, `torch._scaled_mm` takes the same
scales (1x128 activation, 128x128 weight blocks; cuBLAS 12.9+) and is faster than the Triton GEMM
(`block_fp8_linear`).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs
from pdlaunch.model.quant.fp8 import FP8_DTYPE, FP8_MAX, INV_FP8_MAX, Fp8Rows
from pdlaunch.model.triton_env import device_entry, device_name, interpret_mode

GROUP = 128  # activation group = weight block edge


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M", "M_OUT", "stride_sr", "stride_sg"])
    def quant_rows_kernel(x_ptr, q_ptr, s_ptr, M, M_OUT, K, stride_x, stride_sr, stride_sg,
                          GROUP_SIZE: tl.constexpr, ROWS: tl.constexpr, FMAX: tl.constexpr,
                          INV_FMAX: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # triton_decode.pdl_enabled: wait for the kernel before, then let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # ROWS rows x one group of columns per program (one row a program made a decode step's MoE
        # activations, 2560 padded rows x 6 groups, 15360 programs of 128 values). Rows M..M_OUT (padding a
        # GEMM needs) are written as zeros.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        group = tl.program_id(1)
        cols = group * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
        col_ok = (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=(rows < M)[:, None] & col_ok,
                    other=0.0)
        x = x.to(tl.float32)
        # The same float32 operations as torch's quantize_per_token* on CUDA, so the values are equal: torch divides
        # by a Python number as a product with its float32 reciprocal (INV_FMAX), by a tensor correctly rounded
        # (Triton's `/` is approximate: about one value in 10^6 came out one fp8 step off).
        scale = tl.maximum(tl.max(tl.abs(x), axis=1) * INV_FMAX, 1e-12)
        q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -FMAX, FMAX)
        out_ok = rows < M_OUT
        tl.store(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], q.to(q_ptr.dtype.element_ty),
                 mask=out_ok[:, None] & col_ok)
        tl.store(s_ptr + rows * stride_sr + group * stride_sg, scale, mask=out_ok)

    @triton.jit(do_not_specialize=["M"])
    def block_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, stride_bs,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # triton_decode.pdl_enabled: wait for the kernel before; the next one starts as these
            tl.extra.cuda.gdc_wait()  # programs end (a big grid: started early, it would share the SMs)
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n  # programs of GROUP_M row tiles walk N together (L2 reuse of B)
        first_m = (pid // per_group) * GROUP_M
        rows_here = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows_here
        pid_n = (pid % per_group) // rows_here
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        k_blocks = tl.cdiv(K, BLOCK_K)
        a = a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
        b = b_ptr + rn[None, :].to(tl.int64) * K + rk[:, None]  # [BLOCK_K, BLOCK_N] view of W^T
        a_scale = as_ptr + rm * k_blocks
        b_scale = bs_ptr + (pid_n * BLOCK_N // 128) * stride_bs
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, k_blocks):
            k_ok = rk < K - kb * BLOCK_K
            av = tl.load(a, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
            bv = tl.load(b, mask=(rn[None, :] < N) & k_ok[:, None], other=0.0)
            sa = tl.load(a_scale + kb, mask=rm < M, other=0.0)
            sb = tl.load(b_scale + kb)
            acc += tl.dot(av, bv) * sa[:, None] * sb
            a += BLOCK_K
            b += BLOCK_K
        c = c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit(do_not_specialize=["M"])
    def block_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_x, stride_s,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FOLD: tl.constexpr, PDL: tl.constexpr):
        # One activation row and BLOCK_N weight rows (inside one 128-row scale block) per program;
        # the rows of one weight tile are neighbours in the grid, so the M programs reading a tile
        # share it through L2. Products on CUDA cores in float32: bf16 activations as they are (no
        # quantization launch), each fp8 weight scaled once per 128-column block. PDL
        # (triton_decode.pdl_enabled): the first weight columns and their scales load before the wait for the
        # kernel before, which computes x (no kernel writes weights).
        # FOLD: the scales multiply x's columns (one product per column, shared by the BLOCK_N rows) and the
        # products add up in a [BLOCK_N, BLOCK_K] float32 tile summed once after the loop, as the bf16 GEMV does;
        # without, each iteration sums every row's 128-column blocks across threads and scales the sums. The
        # same value up to float32 rounding; FOLD is faster where K is long (`gemv_fold`).
        pid = tl.program_id(0)
        row = pid % M
        pid_n = pid // M
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rb = tl.arange(0, BLOCK_K // 128)
        n_ok = rn < N
        w = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
        x = x_ptr + row * stride_x + rk
        scale_row = s_ptr + (pid_n * BLOCK_N // 128) * stride_s
        k_ok = rk < K
        w_first = tl.load(w, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if FOLD:
            s_first = tl.load(scale_row + rk // 128, mask=k_ok, other=0.0)  # [BLOCK_K]: each column's scale
        else:
            s_first = tl.load(scale_row + rb, mask=rb * 128 < K, other=0.0)  # [BLOCK_K // 128]
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        xv = tl.load(x, mask=k_ok, other=0.0).to(tl.float32)
        if FOLD:
            tile = w_first.to(tl.float32) * (xv * s_first)[None, :]
            scales = scale_row + rk // 128
            for k0 in range(BLOCK_K, K, BLOCK_K):
                w += BLOCK_K
                x += BLOCK_K
                scales += BLOCK_K // 128
                k_ok = rk < K - k0
                wv = tl.load(w, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                xv = tl.load(x, mask=k_ok, other=0.0).to(tl.float32) * tl.load(scales, mask=k_ok, other=0.0)
                tile += wv.to(tl.float32) * xv[None, :]
            acc = tl.sum(tile, axis=1)
        else:
            part = tl.sum(tl.reshape(w_first.to(tl.float32) * xv[None, :], (BLOCK_N, BLOCK_K // 128, 128)), axis=2)
            acc = tl.sum(part * s_first[None, :], axis=1)
            scales = scale_row + rb
            for k0 in range(BLOCK_K, K, BLOCK_K):
                w += BLOCK_K
                x += BLOCK_K
                scales += BLOCK_K // 128
                k_ok = rk < K - k0
                wv = tl.load(w, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                xv = tl.load(x, mask=k_ok, other=0.0).to(tl.float32)
                part = tl.sum(tl.reshape(wv * xv[None, :], (BLOCK_N, BLOCK_K // 128, 128)), axis=2)
                sv = tl.load(scales, mask=rb * 128 < K - k0, other=0.0)
                acc += tl.sum(part * sv[None, :], axis=1)
        tl.store(y_ptr + row * N + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit(do_not_specialize=["M"])
    def block_gemm_split_kernel(x_ptr, xs_ptr, w_ptr, y_ptr, ws_ptr, part_ptr, count_ptr, M, N, K, stride_x,
                                stride_ws, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                SPLIT_K: tl.constexpr, PDL: tl.constexpr, STORE: tl.constexpr):
        if PDL:  # triton_decode.pdl_enabled: wait for the kernel before; the next one starts as these
            tl.extra.cuda.gdc_wait()  # programs end (a big grid: started early, it would share the SMs)
        # Few rows: one program per (BLOCK_N weight rows, K range), so that a decode batch's GEMM has enough
        # programs to stream the weight at the copy rate; x is fp8 with a scale per row and 128-column block (xs),
        # each block's fp8 x fp8 product scaled and added in float32. With SPLIT_K ranges each writes its float32
        # partial and the last one of its N tile to finish adds them up in range order (deterministic), then
        # resets the tile's counter (STORE: model/decode_gemm.py's split_store).
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, 128)
        m_ok = rm < M
        n_ok = rn < N
        k_start = split * k_per_split
        x = x_ptr + rm[:, None].to(tl.int64) * stride_x + k_start + rk[None, :]
        w = w_ptr + rn[None, :].to(tl.int64) * K + k_start + rk[:, None]  # [128, BLOCK_N] view of W^T
        w_scale = ws_ptr + (pid_n * BLOCK_N // 128) * stride_ws + k_start // 128
        x_scale = xs_ptr + rm * (K // 128) + k_start // 128
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, tl.minimum(k_per_split, K - k_start), 128):
            xv = tl.load(x, mask=m_ok[:, None], other=0.0)
            sa = tl.load(x_scale, mask=m_ok, other=0.0)
            wv = tl.load(w, mask=n_ok[None, :], other=0.0)
            sb = tl.load(w_scale)
            acc += tl.dot(xv, wv) * sa[:, None] * sb
            x_scale += 1
            x += 128
            w += 128
            w_scale += 1
        STORE(acc, y_ptr, y_ptr, part_ptr, count_ptr, rm, rn, M, N, pid_n, split, BLOCK_M, SPLIT_K, False)

    return SimpleNamespace(quant_rows=quant_rows_kernel, block_gemm=block_gemm_kernel, block_gemv=block_gemv_kernel,
                           block_gemm_split=block_gemm_split_kernel)


def quantize_rows(x: torch.Tensor, group: int | None, pad_rows: int = 1,
                  column_major_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] CUDA -> (fp8 [M', K], float32 scales [M', K / group]); group None = one scale per row. M' is M
    rounded up to a multiple of `pad_rows`, the extra rows zeros; `column_major_scales` lays the scales out with
    strides (1, M') (what cuBLAS's 1x128 block scales take)."""
    import triton

    x = x.contiguous()
    m, k = x.shape
    m_out = -(-m // pad_rows) * pad_rows
    size = group or triton.next_power_of_2(k)
    groups = -(-k // size)
    q = torch.empty(m_out, k, dtype=FP8_DTYPE, device=x.device)
    if column_major_scales:
        s = torch.empty(groups, m_out, dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty(m_out, groups, dtype=torch.float32, device=x.device)
    if m_out:
        rows = max(1, min(16, 2048 // size))  # up to 2048 values a program
        pdl = pdl_enabled(x, m)
        _kernels().quant_rows[(-(-m_out // rows), groups)](x, q, s, m, m_out, k, x.stride(0), s.stride(0),
                                                           s.stride(1), GROUP_SIZE=size, ROWS=rows, FMAX=FP8_MAX,
                                                           INV_FMAX=INV_FP8_MAX, PDL=pdl, num_warps=4,
                                                           **pdl_kwargs(pdl))
    return q, s


def _config(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): small M (decode) reads weights with many thin tiles."""
    if m <= 16:
        return 16, 32, 4, 4
    if m <= 64:
        return 64, 64, 4, 4
    return 128, 128, 8, 3


# One row (decode of one sequence): the weight-only kernel. At 4 rows it reads each weight tile once per row
# and measured 2.6-3x the weight-read floor on an H200, behind the GEMM (benchmarks/RESULTS.md, "FP8 decode").
GEMV_MAX_ROWS = 1
GemvConfig = tuple[int, int, int]  # (BLOCK_N, BLOCK_K, num_warps)
# Within 4% of the best of 20 configurations at every Llama-3-8B projection on an H200 (fp8_bench.py
# --gemv-sweep): 8 weight rows and 1024 columns (8 KiB of fp8) per loop iteration.
GEMV_CONFIG: GemvConfig = (8, 1024, 4)
# Where the scales fold into x (the kernel's FOLD): weights of up to 4096 rows, and of up to 8192 rows from 8192
# columns. One H200, 8 x 1024 tiles, weights in rotation, us per call: folded faster at 2048 x 4096 (5.3 -> 4.8),
# 4096 x 4096 (7.8 -> 6.1), 4096 x 14336 (23.3 -> 17.7; floor 14.1), 8192 x 8192 (23.2 -> 20.7), 8192 x 28672
# (76-83 -> 64.5); slower at 5120 x 2048 (4.5 -> 5.9), 6144 x 4096 (8.6 -> 10.5), 10240 x 8192, 28672 x 4096
# (30.2-31.5 -> 35.6), 57344 x 8192; the H100 agrees at every one of these shapes. In the 8B block-FP8 batch-1 step
# that is 2.80 -> 2.74 ms (H200), 3.40 -> 3.36 (H100) (benchmarks/RESULTS.md, "The FP8 GEMV's scales folded into
# x").
FOLD_MAX_ROWS, FOLD_LONG_MAX_ROWS, FOLD_LONG_MIN_COLUMNS = 4096, 8192, 8192


def gemv_fold(n: int, k: int) -> bool:
    """True when a weight of `n` rows and `k` columns runs the GEMV with its scales folded into x."""
    return n <= FOLD_MAX_ROWS or (n <= FOLD_LONG_MAX_ROWS and k >= FOLD_LONG_MIN_COLUMNS)


# Per device (a substring of torch's device name), weights of exactly these (rows, columns): the GEMV's
# (BLOCK_N, BLOCK_K, num_warps) and whether it folds, the fastest of 16 configs x folded or not with weights in
# rotation (fp8_bench.py --gemv-rotated-sweep), kept because whole steps confirmed them on the H200: Llama-3-8B
# block-FP8 1 x 128 2.73-2.74 -> 2.69 ms (against the fold rule alone), Qwen3-30B-A3B with FP8 experts and attention
# at batch 1 2.675 -> 2.64 ms (against the untuned GEMV) (benchmarks/RESULTS.md, "Per-shape GEMV launches on the
# H200"); on the H100 the Qwen3-30B-A3B ones, 2.82 -> 2.78 ms (its Llama-3-8B qkv entry, 4% faster alone, left
# the step where it was: dropped). Other weights (tensor-parallel shards, other models, other devices):
# GEMV_CONFIG and gemv_fold.
GEMV_SHAPE_CONFIGS: dict[str, dict[tuple[int, int], tuple[GemvConfig, bool]]] = {
    "H200": {(6144, 4096): ((16, 1024, 8), False), (4096, 4096): ((4, 2048, 4), False),  # Llama-3-8B qkv, o
             (28672, 4096): ((8, 2048, 4), False), (4096, 14336): ((4, 2048, 4), False),  # gate_up, down
             (5120, 2048): ((8, 2048, 4), False), (2048, 4096): ((4, 2048, 4), True)},  # Qwen3-30B-A3B qkv, o
    "H100": {(5120, 2048): ((4, 1024, 4), False), (2048, 4096): ((8, 2048, 8), True)},  # Qwen3-30B-A3B qkv, o
}


def gemv_launch(device_name: str, n: int, k: int) -> tuple[GemvConfig, bool]:
    """The GEMV's (config, fold) for a weight of `n` rows and `k` columns on the device torch names `device_name`."""
    table = device_entry(GEMV_SHAPE_CONFIGS, device_name, {})
    return table.get((n, k), (GEMV_CONFIG, gemv_fold(n, k)))


def block_fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, out_dtype: torch.dtype,
                   config: GemvConfig | None = None, fold: bool | None = None) -> torch.Tensor:
    """Weight-only FP8 for a few rows: x [M, K] as it is (no activation quantization) times the
    block-scaled weight [N, K], K a multiple of 128 -> [M, N]. `config` and `fold` override `gemv_launch`'s
    choice (benchmarks, tests): a config given alone runs with gemv_fold's choice."""
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    if config is None:
        tuned, tuned_fold = gemv_launch(device_name(x.device.index or 0) if x.is_cuda else "", n, k)
        config, fold = tuned, tuned_fold if fold is None else fold
    block_n, block_k, warps = config
    pdl = pdl_enabled(x, m)
    _kernels().block_gemv[(m * -(-n // block_n),)](x, weight, weight_scale, out, m, n, k, x.stride(0),
                                                   weight_scale.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                                   FOLD=gemv_fold(n, k) if fold is None else fold, PDL=pdl,
                                                   **pdl_kwargs(pdl), num_warps=warps)
    return out


# Up to this many rows (decode batches) the split GEMM: the weight read once by enough programs to fill the GPU.
SPLIT_MAX_ROWS = 64
# Tried and dropped (benchmarks/RESULTS.md): x quantized inside the GEMM, and the weight tile widened to bf16 in
# registers (weight-only). Both were slower than quantize_rows' launch + fp8 x fp8 at every shape but one.
SplitConfig = tuple[int, int, int, int]  # (BLOCK_N, SPLIT_K, num_warps, num_stages)


# Up to this many rows (BLOCK_M 16 or 32), where every K range is at least WIDE_SPLIT_MIN_BLOCKS 128-column blocks
# long and that gives WIDE_SPLIT_MIN ranges or more, the K dimension splits into as many such ranges as keep the
# programs within WIDE_SPLIT_PER_SM a SM. With the weights read from memory (benchmarks/fp8_small_m_rotated.py, each
# call's weight another of >= 256 MB of copies, CUDA graphs of 24 calls; one H200, 2-32 rows), us a call, against
# the one-per-SM rule: Llama-3-8B qkv 4 ranges 13.2-14.3 against 16.6-17.8 (the tiled GEMM), o 4 ranges 11.4-12.5
# against 13.0-14.9 (2 ranges; 8 ranges 12.7-13.4), down 8 ranges 23.0-23.4 against 31.4-31.8 up to 16 rows and
# 26.6 against 34.6 at 32; Qwen3-30B-A3B o the same 4 ranges either way, its qkv (16 blocks: 2 ranges, 12.1 us
# against the tiled GEMM's 11.3 at 2 rows) keeps the old rule. At 64 rows 4 ranges lost (Llama-3-8B qkv 18.6
# against 16.5, o 14.6 against 13.1): from 33 rows the old rule, which came from timings with the weight in L2.
WIDE_SPLIT_MAX_ROWS = 32
WIDE_SPLIT_MIN_BLOCKS = 8
WIDE_SPLIT_MIN = 4
WIDE_SPLIT_PER_SM = 4
# From 33 rows, a weight whose K holds at least this many 128-column blocks (Llama-3-8B down_proj: 112) takes tiles
# of 32 weight rows and K in ranges of at least WIDE_SPLIT_MIN_BLOCKS blocks within WIDE_SPLIT_PER_SM programs a SM
# (4 ranges, 512 programs): one H100, weights in rotation (fp8_small_m_rotated.py), us a call at 33 / 48 / 64 rows:
# 32.7 / 32.5 / 33.3 against the old rule's 64-row tiles in 2 ranges, 36.1 / 35.4 / 36.6. Shorter weights keep
# the old rule there (Llama-3-8B o_proj in 32-row tiles and 4 ranges: 14.9 against 13.9 us at 48 rows).
LONG_K_MIN_BLOCKS = 64


def split_config(n: int, k: int, num_sms: int, rows: int = SPLIT_MAX_ROWS) -> SplitConfig:
    """64 weight rows a program. Up to WIDE_SPLIT_MAX_ROWS rows, K in as many ranges of at least
    WIDE_SPLIT_MIN_BLOCKS blocks as keep the programs within WIDE_SPLIT_PER_SM a SM, where that is WIDE_SPLIT_MIN
    ranges or more; from there, for a K of LONG_K_MIN_BLOCKS blocks or more, the same with 32 weight rows a
    program. Otherwise the K ranges doubled (each at least four 128-column blocks) while the programs stay
    within one per SM (on an H200 at 64 rows: Qwen3-30B-A3B o_proj 4 ranges 9.8 us against 12.1 with 8,
    Llama-3-8B o_proj 2 ranges 10.5 against 12.2 with 4; fp8_bench.py --small-m --split-sweep). Depends on the
    weight's shape, the device and whether `rows` is past WIDE_SPLIT_MAX_ROWS (a BLOCK_M of 64 already), so the
    warm-up's power-of-two prompts compile every variant a decode batch uses."""
    return _split_config(n, k, num_sms, rows <= WIDE_SPLIT_MAX_ROWS)


@functools.lru_cache(maxsize=64)
def _split_config(n: int, k: int, num_sms: int, few_rows: bool) -> SplitConfig:
    block_n = 64
    tiles, k_blocks = -(-n // block_n), k // GROUP
    if few_rows:
        wide = _wide_ranges(tiles, k_blocks, num_sms)
        if wide >= WIDE_SPLIT_MIN:
            return block_n, wide, 4, 4
    elif k_blocks >= LONG_K_MIN_BLOCKS:
        wide = _wide_ranges(-(-n // 32), k_blocks, num_sms)
        if wide > 1:
            return 32, wide, 4, 4
    split = 1
    while tiles * split * 2 <= num_sms and split * 8 <= k_blocks:
        split *= 2
    return block_n, split, 4, 4


def _wide_ranges(tiles: int, k_blocks: int, num_sms: int) -> int:
    """K ranges for `tiles` N tiles, doubled while each keeps WIDE_SPLIT_MIN_BLOCKS blocks and the programs stay
    within WIDE_SPLIT_PER_SM a SM."""
    ranges = 1
    while k_blocks // (ranges * 2) >= WIDE_SPLIT_MIN_BLOCKS and tiles * ranges * 2 <= WIDE_SPLIT_PER_SM * num_sms:
        ranges *= 2
    return ranges


def block_fp8_split_gemm(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                         out_dtype: torch.dtype, config: SplitConfig | None = None) -> torch.Tensor:
    """x [M, K] (M <= SPLIT_MAX_ROWS, K a multiple of 128) quantized per row and 128-column block (quantize_rows,
    or given so with row-major scales) times the block-scaled weight [N, K] -> [M, N], the K dimension split into
    ranges whose float32 partials the last range of each N tile adds in order."""
    import triton

    from pdlaunch.model.decode_gemm import split_store  # layering: lazy, like the kernels
    from pdlaunch.model.split_counters import num_sms, split_counters

    m, k = x.shape
    x, xs = _quantized(x, column_major=False)
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    block_n, split, warps, stages = config or split_config(n, k, num_sms(x.device.index or 0), m)
    k_per_split = -(-(k // GROUP) // split) * GROUP
    split = -(-k // k_per_split)  # ranges that hold any columns
    tiles = -(-n // block_n)
    block_m = max(16, triton.next_power_of_2(m))
    part, counters = out, out  # unread with one range
    if split > 1:
        part = torch.empty(split, block_m, n, dtype=torch.float32, device=x.device)
        counters = split_counters(x.device, tiles)
    pdl = pdl_enabled(x, m)
    _kernels().block_gemm_split[(tiles, split)](x, xs, weight, out, weight_scale, part, counters, m, n, k,
                                                x.stride(0), weight_scale.stride(0), k_per_split, BLOCK_M=block_m,
                                                BLOCK_N=block_n, SPLIT_K=split, PDL=pdl,
                                                STORE=split_store(interpret_mode()),
                                                **pdl_kwargs(pdl),
                                                num_warps=warps, num_stages=stages)
    return out


# From this many rows (a decode batch past the split GEMM's, a prefill) torch._scaled_mm's block-scaled cuBLAS GEMM
# where the device runs it: on an H100 it took 13-17 us against the Triton GEMM's 25 at 128-256 rows, and
# 0.62-0.69x of its time at 4096 rows (fp8_bench.py --cublas-block; benchmarks/RESULTS.md). Below, the split GEMM
# and the tiled one are faster (cuBLAS's fixed cost is ~13 us).
CUBLAS_MIN_ROWS = SPLIT_MAX_ROWS + 1
# Weights this large (Llama-3-8B gate_up, 117M) take cuBLAS from 17 rows: on an H200 at 32 / 64 rows 37.8 / 37.5 us
# against the tiled GEMM's 44.6 / 47.0 (H100: 52.8 / 51.9 against 58.7 / 61.6); at 16 rows they tie. Smaller ones
# (qkv, o, down) stay on the Triton kernels up to 64 rows (qkv at 64 rows: 15.2 against 12.7 us).
CUBLAS_LARGE_WEIGHT = 1 << 26
CUBLAS_LARGE_MIN_ROWS = 17
# Per device (a substring of torch's device name): the tiled GEMM's config for such weights from
# LARGE_TILED_MIN_ROWS to SPLIT_MAX_ROWS rows, instead of cuBLAS. One H100, weights in rotation
# (fp8_small_m_rotated.py), Llama-3-8B gate_up at 33 / 48 / 64 rows: 64 x 128 tiles in 3 stages 51.6 / 50.4 / 51.1
# us against cuBLAS's 53.6 / 53.1 / 53.6 (64 x 64 tiles: 52.1-52.2). The H200 (cuBLAS 37.5 us at 64 rows against
# 44.6-47.0 in 64 x 64 tiles) keeps cuBLAS.
LARGE_WEIGHT_TILED: dict[str, tuple[int, int, int, int]] = {"H100": (64, 128, 4, 3)}
LARGE_TILED_MIN_ROWS = WIDE_SPLIT_MAX_ROWS + 1
CUBLAS_ROW_MULTIPLE = 4  # the 1x128 scales' column stride must be 16-byte aligned: M a multiple of 4
# The weight scales' leading dimension (K / 128 floats) too: with K = 256 cuBLAS read them wrongly (H200), so K must
# be a multiple of 512 (every model dimension we serve is: 2048, 4096, 14336, their TP shards).
CUBLAS_K_MULTIPLE = 4 * GROUP
CUBLAS_N_MULTIPLE = 16  # torch._scaled_mm's check on the second operand


_cublas_block: dict[int, bool] = {}


def cublas_block_scaled(device: torch.device) -> bool:
    """Whether torch._scaled_mm runs 1x128 activation x 128x128 weight scales on `device`: compute capability 9.0
    (cuBLAS 12.9+ has them for Hopper only), checked once per device by a call on 4 x 256 x 256 operands. Run it
    outside CUDA-graph capture first (finish_loading does, at load)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cublas_block:
        ok = torch.cuda.get_device_capability(index) == (9, 0)
        if ok:
            # K and N of two blocks: with one, [M, 1] activation scales would read as row-wise ones.
            x = torch.zeros(4, 2 * GROUP, dtype=FP8_DTYPE, device=device)
            w = torch.zeros(2 * GROUP, 2 * GROUP, dtype=FP8_DTYPE, device=device)
            try:
                torch._scaled_mm(x, w.t(), scale_a=torch.ones(2, 4, device=device).t(),
                                 scale_b=torch.ones(2, 2, device=device).t(), out_dtype=torch.bfloat16)
            except (RuntimeError, ValueError):
                ok = False
        _cublas_block[index] = ok
    return _cublas_block[index]


def cublas_shape_ok(n: int, k: int) -> bool:
    """A weight [N, K] cuBLAS's block-scaled GEMM takes (CUBLAS_N_MULTIPLE, CUBLAS_K_MULTIPLE)."""
    return k % CUBLAS_K_MULTIPLE == 0 and n % CUBLAS_N_MULTIPLE == 0


def cublas_block_linear(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] quantized per row and 128 columns (rows padded to CUBLAS_ROW_MULTIPLE, scales column-major; or
    given so) times the block-scaled weight [N, K] by torch._scaled_mm (cuBLAS) -> [M, N]; K a multiple of
    CUBLAS_K_MULTIPLE, N of CUBLAS_N_MULTIPLE; weight_scale [ceil(N/128), K/128] contiguous, handed over transposed
    ([K/128, N/128], strides (1, K/128)), as cuBLAS takes the second operand's."""
    m, k = x.shape
    if not cublas_shape_ok(weight.shape[0], k):
        raise ValueError(f"cuBLAS block scales need K a multiple of {CUBLAS_K_MULTIPLE} and N of {CUBLAS_N_MULTIPLE}, "
                         f"got K {k}, N {weight.shape[0]}")
    xq, xs = _quantized(x, column_major=True)
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.t(), out_dtype=out_dtype)
    return y[:m]


def _quantized(x: torch.Tensor | Fp8Rows, column_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 x, its scales) for a GEMM that takes its scales row-major or (cuBLAS, rows padded) column-major: x
    quantized here, or as given when its scales lie that way already."""
    if isinstance(x, Fp8Rows):
        if x.column_major != column_major:
            raise ValueError(f"x's scales are {'column' if x.column_major else 'row'}-major, this GEMM takes them "
                             f"{'column' if column_major else 'row'}-major (lay them out as fp8_input_layout says)")
        return x.q, x.scales
    if column_major:
        return quantize_rows(x, GROUP, pad_rows=CUBLAS_ROW_MULTIPLE, column_major_scales=True)
    return quantize_rows(x, GROUP)


TiledConfig = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


def _route(m: int, n: int, k: int, device: torch.device, weight_scale: torch.Tensor,
           config: TiledConfig | None) -> tuple[str, TiledConfig]:
    """Which GEMM block_fp8_linear runs for x of `m` rows and a weight [n, k]: "gemv", "split", "cublas" or
    "tiled", and the tiled GEMM's config (the given one, a device's LARGE_WEIGHT_TILED entry or `_config(m)`).
    Off CUDA (the Triton interpreter) the GEMV or the tiled GEMM: the others size themselves by the device."""
    from pdlaunch.model.split_counters import num_sms  # layering: lazy, like the kernels

    if config is None and m <= GEMV_MAX_ROWS:
        return "gemv", _config(m)
    if device.type != "cuda":
        return "tiled", config or _config(m)
    if config is None and m <= SPLIT_MAX_ROWS and k % GROUP == 0 and split_config(n, k, num_sms(device.index or 0),
                                                                                  m)[1] > 1:
        return "split", _config(m)
    large = n * k >= CUBLAS_LARGE_WEIGHT
    if large and config is None and LARGE_TILED_MIN_ROWS <= m <= SPLIT_MAX_ROWS:
        config = device_entry(LARGE_WEIGHT_TILED, device_name(device.index or 0), None)
    rows_enough = m >= CUBLAS_MIN_ROWS or (large and m >= CUBLAS_LARGE_MIN_ROWS)
    if (rows_enough and config is None and cublas_shape_ok(n, k) and weight_scale.is_contiguous()
            and cublas_block_scaled(device)):
        return "cublas", _config(m)
    return "tiled", config or _config(m)


def fp8_input_layout(m: int, weight: torch.Tensor, weight_scale: torch.Tensor) -> bool | None:
    """How a kernel that computes x [m, K] for `block_fp8_linear(x, weight, ...)` should quantize it in place of
    the layer's own launch: True, scales column-major (cuBLAS); False, row-major (the split and tiled GEMMs); None,
    not at all: the layer takes x as it is (the GEMV's rows), or pads rows cuBLAS needs (m not a multiple of
    CUBLAS_ROW_MULTIPLE), or K is not a multiple of 128."""
    n, k = weight.shape
    if m == 0 or k % GROUP:
        return None
    route, _ = _route(m, n, k, weight.device, weight_scale, None)
    if route == "gemv" or (route == "cublas" and m % CUBLAS_ROW_MULTIPLE):
        return None
    return route == "cublas"


def block_fp8_linear(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
                     out_dtype: torch.dtype, config: TiledConfig | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32, or Fp8Rows laid out as `fp8_input_layout` says), weight [N, K] fp8,
    weight_scale [ceil(N/128), K/128] -> [M, N].
    Activations are quantized per 128-column group (quantize_rows) for the GEMMs: up to GEMV_MAX_ROWS rows the
    weight-only kernel instead; up to SPLIT_MAX_ROWS the split GEMM where its weight is split (few N tiles, long
    K: o_proj, down_proj); from CUBLAS_MIN_ROWS (CUBLAS_LARGE_MIN_ROWS for weights of CUBLAS_LARGE_WEIGHT
    elements, but on the devices LARGE_WEIGHT_TILED names, the tiled GEMM in its config from LARGE_TILED_MIN_ROWS
    to SPLIT_MAX_ROWS) cuBLAS's block-scaled GEMM where the device has it; else the tiled GEMM. With one range the
    split GEMM measured no faster than the tiled one (qkv at 2 rows: 14.5 against 12.1 us on an H200, fp8_bench.py
    --small-m).
    `config`: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the Triton GEMM instead of the tuned choice
    (benchmarks)."""
    m, k = x.shape
    n = weight.shape[0]
    device = x.q.device if isinstance(x, Fp8Rows) else x.device
    route, tiled = _route(m, n, k, device, weight_scale, config)
    if route == "gemv":
        if isinstance(x, Fp8Rows):
            raise ValueError(f"{m} row(s) take the weight-only GEMV, which reads x unquantized (fp8_input_layout)")
        return block_fp8_gemv(x, weight, weight_scale, out_dtype)
    if route == "split":
        return block_fp8_split_gemm(x, weight, weight_scale, out_dtype)
    if route == "cublas":
        return cublas_block_linear(x, weight, weight_scale, out_dtype)
    xq, xs = _quantized(x, column_major=False)
    out = torch.empty(m, n, dtype=out_dtype, device=device)
    if m == 0:
        return out
    block_m, block_n, warps, stages = tiled
    grid = (-(-m // block_m) * -(-n // block_n),)
    pdl = pdl_enabled(xq, m)
    _kernels().block_gemm[grid](xq, weight, out, xs, weight_scale, m, n, k, weight_scale.stride(0),
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=GROUP, GROUP_M=8,
                                PDL=pdl, **pdl_kwargs(pdl), num_warps=warps, num_stages=stages)
    return out


def channel_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K], weight [N, K] fp8, weight_scale [1, N] float32 -> [M, N]: per-token activation scales,
    `torch._scaled_mm` with row-wise scaling (the second operand column-major: W^T of the row-major weight)."""
    xq, xs = quantize_rows(x, None)
    return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale, out_dtype=out_dtype)
