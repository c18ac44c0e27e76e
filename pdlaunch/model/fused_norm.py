"""RMSNorm as one fused kernel (fused_kernels.py): `rms_norm`, `fused_add_rms_norm` (the residual added first,
an MoE layer's partial rows summed first) and `rms_norm_fp8` (the output quantized for a block-FP8 layer in the
same kernel); the torch reference where the kernels do not run (fused_ops.py says where)."""

from __future__ import annotations

import torch

from pdlaunch.model.fused_kernels import kernels_for
from pdlaunch.model.fused_ops import check, check_fp8_width, fp8_rows, fused_available, num_warps
from pdlaunch.model.fused_reference import fused_add_rms_norm_torch, rms_norm_torch
from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs, pdl_release
from pdlaunch.model.quant.fp8 import FP8_MAX, INV_FP8_MAX, Fp8Rows
from pdlaunch.model.triton_env import interpret_mode


def _rms_norm_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     fp8: bool | None = None) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor | None]:
    """The norm kernel; `fp8` not None: y quantized into Fp8Rows, scales column-major when True."""
    check(weight.dtype == x.dtype and weight.shape == (x.shape[-1],), "weight",
          f"weight {tuple(weight.shape)} {weight.dtype} does not match x {tuple(x.shape)} {x.dtype}",
          "weight must be [H] in x's dtype")
    kernels = kernels_for(interpret_mode())
    tokens, hidden = x.shape[0], x.shape[-1]
    parts = x.shape[1] if x.dim() == 3 else 1
    rows = None
    if fp8 is None:
        y = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
        scales = y
    else:
        check_fp8_width(hidden, "x")
        rows = fp8_rows(tokens, hidden, fp8, x)
        y, scales = rows.q, rows.scales
    pdl = pdl_enabled(x, tokens)
    res_out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device) if residual is not None else None
    r = residual if residual is not None else x
    block = kernels.next_power_of_2(hidden)
    kernels.rms_norm[(tokens,)](x, r, weight, y, res_out if res_out is not None else y, scales, hidden, eps,
                                x.stride(0), x.stride(1) if parts > 1 else 0, x.stride(-1), r.stride(0), r.stride(-1),
                                weight.stride(0), scales.stride(0), scales.stride(1),
                                ADD_RESIDUAL=residual is not None, BLOCK_H=block, PARTS=parts,
                                PDL=pdl, RELEASE=not pdl and pdl_release(x, tokens), QUANT=fp8 is not None,
                                QUANTIZE=kernels.quantize_groups, FMAX=FP8_MAX, INV_FMAX=INV_FP8_MAX,
                                NORMALIZE=kernels.normalize, num_warps=num_warps(block), enable_fp_fusion=False,
                                **pdl_kwargs(pdl))
    return (y if rows is None else rows), res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H] (any strides), weight: [H] in x's dtype -> new [T, H]."""
    if not fused_available(x):
        return rms_norm_torch(x, weight, eps)
    y = _rms_norm_launch(x, None, weight, eps)[0]
    assert isinstance(y, torch.Tensor)
    return y


def _check_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    check(x.dim() in (2, 3) and residual.shape == (x.shape[0], x.shape[-1]) and residual.dtype == x.dtype,
          "residual",
          f"residual {tuple(residual.shape)} {residual.dtype} does not match x {tuple(x.shape)} {x.dtype}",
          "pass the residual stream of the same tokens")


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H] -> (y, new_residual), both new [T, H]: new_residual = x + residual. x may also be
    [T, k, H] partial rows, summed over k first (an MoE layer's combine, done here instead of by its own kernel)."""
    if not fused_available(x):
        return fused_add_rms_norm_torch(x, residual, weight, eps)
    _check_residual(x, residual)
    y, new_residual = _rms_norm_launch(x, residual, weight, eps)
    assert isinstance(y, torch.Tensor) and new_residual is not None
    return y, new_residual


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                 column_major: bool) -> tuple[Fp8Rows, torch.Tensor | None]:
    """rms_norm (residual None) or fused_add_rms_norm, its output quantized per row and 128-column group in the
    same kernel, as quant/activations.py's quantize_rows would quantize it (equal values) -> (Fp8Rows for a block-FP8
    layer, scales column-major when `column_major`; the new residual or None). Needs the fused ops
    (`fused_available(x)`) and H a multiple of 128."""
    check(fused_available(x), "x", f"a {x.device.type} {x.dtype} tensor has no fused kernels",
          "quantize in the norm only where fused_available(x)")
    if residual is not None:
        _check_residual(x, residual)
    y, new_residual = _rms_norm_launch(x, residual, weight, eps, column_major)
    assert isinstance(y, Fp8Rows)
    return y, new_residual
