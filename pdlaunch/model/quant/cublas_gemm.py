"""The block-FP8 GEMM of cuBLAS: `torch._scaled_mm` with 1x128 activation and 128x128 weight block scales
(cuBLAS 12.9+, sm_90 only), checked once per device (`cublas_block_scaled`).
"""

from __future__ import annotations

import torch

from pdlaunch.model.quant.activations import GROUP, quantized
from pdlaunch.model.quant.fp8 import FP8_DTYPE, Fp8Rows

# The weight scales' leading dimension (K / 128 floats) 16-byte aligned too, as the activation scales' column
# stride (activations.CUBLAS_ROW_MULTIPLE): with K = 256 cuBLAS read them wrongly (H200), so K must be a multiple
# of 512 (every model dimension we serve is: 2048, 4096, 14336, their TP shards).
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
    xq, xs = quantized(x, column_major=True)
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.t(), out_dtype=out_dtype)
    return y[:m]
