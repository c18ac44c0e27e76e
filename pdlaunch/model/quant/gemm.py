"""The GEMM of an FP8 linear layer on the GPU: `block_fp8_linear` routes x times a 128x128-block FP8 weight to
the weight-only GEMV (block_gemv.py), the split GEMM (split_gemm.py), cuBLAS's (cublas_gemm.py) or the tiled
Triton GEMM here; `channel_fp8_linear` is `torch._scaled_mm` with per-channel scales.

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
from pdlaunch.model.quant.activations import CUBLAS_ROW_MULTIPLE, GROUP, quantize_rows, quantized
from pdlaunch.model.quant.block_gemv import GEMV_MAX_ROWS, block_fp8_gemv
from pdlaunch.model.quant.cublas_gemm import cublas_block_linear, cublas_block_scaled, cublas_shape_ok
from pdlaunch.model.quant.fp8 import Fp8Rows
from pdlaunch.model.quant.split_gemm import SPLIT_MAX_ROWS, WIDE_SPLIT_MAX_ROWS, block_fp8_split_gemm, split_config
from pdlaunch.model.triton_env import device_entry, device_name


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M"])
    def block_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, stride_bs,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # pdl.pdl_enabled: wait for the kernel before; the next one starts as these
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

    return SimpleNamespace(block_gemm=block_gemm_kernel)


def _config(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): small M (decode) reads weights with many thin tiles."""
    if m <= 16:
        return 16, 32, 4, 4
    if m <= 64:
        return 64, 64, 4, 4
    return 128, 128, 8, 3


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
    xq, xs = quantized(x, column_major=False)
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
