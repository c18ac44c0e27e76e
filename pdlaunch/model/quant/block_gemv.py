"""The weight-only block-FP8 GEMV of one-row decode (Triton): x as it is (no activation quantization) times a
128x128-block FP8 weight, its launch per weight shape and device (`gemv_launch`).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs
from pdlaunch.model.triton_env import device_entry, device_name


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M"])
    def block_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_x, stride_s,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FOLD: tl.constexpr, PDL: tl.constexpr):
        # One activation row and BLOCK_N weight rows (inside one 128-row scale block) per program;
        # the rows of one weight tile are neighbours in the grid, so the M programs reading a tile
        # share it through L2. Products on CUDA cores in float32: bf16 activations as they are (no
        # quantization launch), each fp8 weight scaled once per 128-column block. PDL
        # (pdl.pdl_enabled): the first weight columns and their scales load before the wait for the
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

    return SimpleNamespace(block_gemv=block_gemv_kernel)


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
