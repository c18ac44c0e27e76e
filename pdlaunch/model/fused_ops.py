"""Fused elementwise ops for the model's hot path: one Triton kernel each on CUDA, torch elsewhere.

Each public op dispatches through `fused_available`: the Triton kernel runs for fp16/bf16/fp32
CUDA tensors (or CPU ones under TRITON_INTERPRET=1) when Triton is importable and
PDLAUNCH_FUSED_OPS is not `torch`; otherwise the `*_torch` reference runs. The references are
the model's eager semantics and the kernels reproduce them rounding step for rounding step:
every bf16/fp16 op of the eager code is an fp32 op rounded to the dtype, so the kernels round
at the same points, use correctly rounded division/sqrt (`div_rn`, `sqrt_rn`; Triton's `/` is
approximate) and launch with `enable_fp_fusion=False` so fp32 `a*b + c*d` is not contracted
into an FMA.

This module holds that dispatch, what the ops' launches share, and the SwiGLU activation
(`silu_and_mul`), the KV cache write (`write_kv`) and the sampler's argmax (`argmax_rows`). The norms are in
fused_norm.py, rotary in fused_rotary.py, the kernels in fused_kernels.py, the references in fused_reference.py.
"""

from __future__ import annotations

import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.fused_kernels import kernels_for
from pdlaunch.model.fused_reference import silu_and_mul_torch, write_kv_torch
from pdlaunch.model.overrides import env_choice
from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs
from pdlaunch.model.quant.fp8 import FP8_DTYPE, FP8_MAX, INV_FP8_MAX, Fp8Rows
from pdlaunch.model.triton_env import interpret_mode, triton_importable

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn)


def fused_ops_setting() -> str:
    """PDLAUNCH_FUSED_OPS: `auto` (unset or empty) or `torch`; any other value is refused naming the variable."""
    return env_choice("PDLAUNCH_FUSED_OPS", ("auto", "torch"))


def use_triton(t: torch.Tensor) -> bool:
    """True when `t`'s op should run the Triton kernel (CUDA or interpreter, not forced off). A CPU tensor outside
    the interpreter never reads the variable: a CPU instance does not fail a step on a GPU setting."""
    if not (t.is_cuda or interpret_mode()):
        return False
    return fused_ops_setting() != "torch" and triton_importable()


def fused_available(t: torch.Tensor) -> bool:
    """True when the ops on tensors like `t` run their Triton kernel: no host sync, CUDA-graph
    capturable. Needs a kernel dtype (fp16/bf16/fp32); others (an fp8 KV cache) take the reference."""
    return t.dtype in _KERNEL_DTYPES and use_triton(t)


def check(ok: bool, field: str, message: str, hint: str) -> None:
    if not ok:
        raise PdlaunchError(message, field=field, hint=hint)


def num_warps(elements: int) -> int:
    return max(1, min(8, elements // 256))


def fp8_rows(tokens: int, width: int, column_major: bool, like: torch.Tensor) -> Fp8Rows:
    """Empty Fp8Rows [tokens, width] (width a multiple of 128) for a kernel to quantize `like`'s values into."""
    q = torch.empty(tokens, width, dtype=FP8_DTYPE, device=like.device)
    groups = width // 128
    scales = (torch.empty(groups, tokens, dtype=torch.float32, device=like.device).t() if column_major
              else torch.empty(tokens, groups, dtype=torch.float32, device=like.device))
    return Fp8Rows(q, scales, column_major, like.dtype)


def check_fp8_width(width: int, field: str) -> None:
    check(width % 128 == 0, field, f"{width} columns do not split into 128-column FP8 groups",
          "quantize in the kernel only for a block-FP8 layer's input (quant/gemm.py fp8_input_layout)")


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] (any strides) -> new [T, I] = silu(gate) * up."""
    if not fused_available(gate_up):
        return silu_and_mul_torch(gate_up)
    out = _silu_and_mul_launch(gate_up, None)
    assert isinstance(out, torch.Tensor)
    return out


def silu_and_mul_fp8(gate_up: torch.Tensor, column_major: bool) -> Fp8Rows:
    """silu_and_mul, its output quantized per row and 128-column group in the same kernel, as quant/activations.py's
    quantize_rows would quantize it (equal values): Fp8Rows for a block-FP8 down projection, scales column-major
    when `column_major`. Needs the fused ops (`fused_available(gate_up)`) and I a multiple of 128."""
    check(fused_available(gate_up), "gate_up", f"a {gate_up.device.type} {gate_up.dtype} tensor has no fused kernels",
          "quantize in the SwiGLU only where fused_available(gate_up)")
    out = _silu_and_mul_launch(gate_up, column_major)
    assert isinstance(out, Fp8Rows)
    return out


def _silu_and_mul_launch(gate_up: torch.Tensor, fp8: bool | None) -> torch.Tensor | Fp8Rows:
    tokens, width = gate_up.shape
    check(width % 2 == 0, "gate_up", f"last dim {width} is odd", "pass the [T, 2I] gate_up projection")
    inter = width // 2
    rows = None
    if fp8 is None:
        out = scales = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    else:
        check_fp8_width(inter, "gate_up")
        rows = fp8_rows(tokens, inter, fp8, gate_up)
        out, scales = rows.q, rows.scales
    interpret = interpret_mode()
    kernels = kernels_for(interpret)
    block = min(1024, kernels.next_power_of_2(inter))
    pdl = pdl_enabled(gate_up, tokens)
    kernels.silu_and_mul[(tokens, -(-inter // block))](
        gate_up, out, scales, inter, gate_up.stride(0), gate_up.stride(1), scales.stride(0), scales.stride(1),
        BLOCK=block, LIBDEVICE_EXP=not interpret, PDL=pdl, QUANT=fp8 is not None, QUANTIZE=kernels.quantize_groups,
        FMAX=FP8_MAX, INV_FMAX=INV_FP8_MAX, num_warps=num_warps(block), enable_fp_fusion=False, **pdl_kwargs(pdl))
    return out if rows is None else rows


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             layer_in_group: int, kv_scales: tuple[float, float] = (1.0, 1.0)) -> None:
    """In place. kv_cache: [num_blocks, layers_in_group, 2, block_size, Hkv, D] contiguous;
    k, v: [T, Hkv, D] (strided views allowed); slot_mapping: [T] int, slot < 0 = skip the token.
    kv_scales: (k_scale, v_scale) of an fp8 cache (ignored for other dtypes)."""
    check(kv_cache.is_contiguous(), "kv_cache", "the KV cache tensor must be contiguous",
          "allocate it block-major as in pdlaunch/model/attention_metadata.py")
    _, layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    check(0 <= layer_in_group < layers, "layer_in_group", f"{layer_in_group} is outside 0..{layers - 1}",
          "pass the layer's index within its KV-cache group")
    check(k.shape == v.shape == (slot_mapping.shape[0], num_kv_heads, head_dim), "k",
          f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit slots {tuple(slot_mapping.shape)} and cache "
          f"heads [{num_kv_heads}, {head_dim}]", "k and v are [T, num_kv_heads, head_dim], one slot per token")
    if not fused_available(kv_cache):
        write_kv_torch(kv_cache, k, v, slot_mapping, layer_in_group, kv_scales)
        return
    kernels = kernels_for(interpret_mode())
    npow2 = kernels.next_power_of_2
    plane = block_size * num_kv_heads * head_dim  # elements of one (block, layer, k|v) slice
    pdl = pdl_enabled(kv_cache, slot_mapping.shape[0])
    kernels.write_kv[(slot_mapping.shape[0],)](
        kv_cache, k, v, slot_mapping, num_kv_heads, block_size, layers * 2 * plane, 2 * layer_in_group * plane,
        *k.stride(), *v.stride(), *kv_scales, D=head_dim, D_PAD=npow2(head_dim), H_PAD=npow2(num_kv_heads),
        FP8=kv_cache.dtype == torch.float8_e4m3fn, PDL=pdl,
        num_warps=num_warps(npow2(num_kv_heads) * head_dim), enable_fp_fusion=False,
        **pdl_kwargs(pdl))


ARGMAX_CHUNK = 2048  # columns a program of argmax_rows reads: 63 programs a row at a 128k vocabulary


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N] long: `logits.argmax(dim=-1)`, the first column of each row's largest value (a NaN counts as
    the largest). On CUDA two launches: the row's chunks in parallel, then the chunks' maxima. torch reduces a
    row with one block of threads, so a step's few rows of a large vocabulary took most of its sampling time (one
    128k row: 27 us on an H200, as long as a layer's attention)."""
    if (logits.dim() != 2 or logits.dtype not in (torch.float16, torch.bfloat16, torch.float32)
            or not use_triton(logits) or logits.numel() == 0 or logits.stride(1) != 1):
        return logits.argmax(dim=-1)
    rows, vocab = logits.shape
    chunks = -(-vocab // ARGMAX_CHUNK)
    kernels = kernels_for(interpret_mode())
    values = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    columns = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    kernels.argmax_chunks[(rows, chunks)](logits, logits.stride(0), vocab, values, columns, chunks,
                                          BLOCK=ARGMAX_CHUNK, num_warps=4)
    kernels.argmax_rows[(rows,)](values, columns, out, chunks, C_PAD=kernels.next_power_of_2(chunks), num_warps=1)
    return out
