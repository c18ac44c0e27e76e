"""Dynamic activation quantization for FP8 linear layers on the GPU (Triton): fp8 e4m3 values with a float32
scale per token, or per token and 128-column group (`quantize_rows`); `quantized`, the fp8 operand a block-FP8
GEMM takes, with its scales row-major or (cuBLAS) column-major.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs
from pdlaunch.model.quant.fp8 import FP8_DTYPE, FP8_MAX, INV_FP8_MAX, Fp8Rows

GROUP = 128  # activation group = weight block edge
CUBLAS_ROW_MULTIPLE = 4  # the 1x128 scales' column stride must be 16-byte aligned: M a multiple of 4


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M", "M_OUT", "stride_sr", "stride_sg"])
    def quant_rows_kernel(x_ptr, q_ptr, s_ptr, M, M_OUT, K, stride_x, stride_sr, stride_sg,
                          GROUP_SIZE: tl.constexpr, ROWS: tl.constexpr, FMAX: tl.constexpr,
                          INV_FMAX: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # pdl.pdl_enabled: wait for the kernel before, then let the next one start
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

    return SimpleNamespace(quant_rows=quant_rows_kernel)


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


def quantized(x: torch.Tensor | Fp8Rows, column_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
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
