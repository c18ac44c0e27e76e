"""The block-FP8 GEMM of decode batches (2-64 rows, Triton): K split into ranges so that enough programs stream
the weight, each range's float32 partial added up in order by the last one of its N tile (`split_config`).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs
from pdlaunch.model.quant.activations import GROUP, quantized
from pdlaunch.model.quant.fp8 import Fp8Rows
from pdlaunch.model.triton_env import interpret_mode


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M"])
    def block_gemm_split_kernel(x_ptr, xs_ptr, w_ptr, y_ptr, ws_ptr, part_ptr, count_ptr, M, N, K, stride_x,
                                stride_ws, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                SPLIT_K: tl.constexpr, PDL: tl.constexpr, STORE: tl.constexpr):
        if PDL:  # pdl.pdl_enabled: wait for the kernel before; the next one starts as these
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

    return SimpleNamespace(block_gemm_split=block_gemm_split_kernel)


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

    from pdlaunch.model.decode_gemm_kernels import split_store  # layering: lazy, like the kernels
    from pdlaunch.model.split_counters import num_sms, split_counters

    m, k = x.shape
    x, xs = quantized(x, column_major=False)
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
