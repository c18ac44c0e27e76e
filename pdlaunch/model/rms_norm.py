"""`RMSNorm`, the decoder's norm layer: HF's LlamaRMSNorm on the fused kernels of fused_norm.py, its output
quantized in the norm's kernel where the FP8 projection after it reads it so."""

from __future__ import annotations

import torch
from torch import nn

from pdlaunch.model.fused_norm import fused_add_rms_norm, rms_norm, rms_norm_fp8
from pdlaunch.model.fused_ops import fused_available
from pdlaunch.model.parallel_linear import ColumnParallelLinear
from pdlaunch.model.quant.fp8 import Fp8Rows
from pdlaunch.model.weight_loader import default_weight_loader, set_loader


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale (order matters for bf16 parity).

    With `residual`, first adds it (the decoder's skip connection) and returns (normed, x + residual):
    one fused kernel on CUDA (model/fused_ops.py), the same rounding steps as eager torch.
    """

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)
        set_loader(self.weight, default_weight_loader)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)

    def into(self, linear: ColumnParallelLinear, x: torch.Tensor,
             residual: torch.Tensor | None) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
        """(the norm of x (+ residual) as `linear` reads it, the residual stream after it): quantized in the norm's
        kernel where linear's FP8 GEMM would quantize it itself (`fp8_input`), else as forward gives it."""
        layout = linear.fp8_input(x.shape[0]) if fused_available(x) else None
        if layout is not None:
            y, new_residual = rms_norm_fp8(x, self.weight, self.eps, residual, layout)
            return y, x if new_residual is None else new_residual
        if residual is None:
            return rms_norm(x, self.weight, self.eps), x
        return fused_add_rms_norm(x, residual, self.weight, self.eps)
