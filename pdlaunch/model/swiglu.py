"""A decode batch's gate_up projection with the SwiGLU in its epilogue: silu(x W_gate^T) * (x W_up^T) in one launch.

A dense MLP at 2-128 rows ran cuBLAS's gate_up GEMM, wrote [T, 2I] in bf16, then launched fused_ops.silu_and_mul
to read it back and write [T, I]. Here each program holds BLOCK_N columns of the gate and the same columns of the
up projection (two weight tiles a loop iteration, the gate_up weight's rows n and I + n, so the checkpoint layout
stays), sums both over all of K in float32, then rounds as the two-launch path rounds: the gate and up products
to the dtype, silu to the dtype, the product to the dtype. The result differs from cuBLAS's only by summation
order. There is no split over K: the intermediate dimension gives enough programs (Llama-3-8B with the table's
32- to 128-column tiles: 448 to 112).

Used only where a per-device table (`SWIGLU_DEVICE_CONFIGS`, measured with benchmarks/swiglu_speed.py) has a
launch for the row count; elsewhere, and with PDLAUNCH_SWIGLU=cublas, the two launches run as before.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import torch

from pdlaunch.model.decode_gemm import tma_aligned
from pdlaunch.model.fused_reference import silu_and_mul_torch
from pdlaunch.model.overrides import env_choice
from pdlaunch.model.pdl import pdl_kwargs, pdl_release
from pdlaunch.model.triton_env import device_entry, device_name, interpret_mode, triton_importable

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, TMA): TMA 1 reads the tiles through the tensor-memory
# accelerator (`swiglu_tma_kernel`; where x or the weight is not 16-byte aligned as TMA needs, the pointer kernel).
SwigluConfig = tuple[int, int, int, int, int, int]
# Per device (a substring of torch's device name): (largest row count, config or None), the first entry that
# covers the rows; None, or no entry: cuBLAS's GEMM and the silu_and_mul launch. Measured with
# benchmarks/swiglu_speed.py on Llama-3-8B's gate_up (4096 -> 2 x 14336), bf16, and kept where whole decode steps
# (benchmarks/decode_grid.py) got faster (benchmarks/RESULTS.md, "A decode batch's SwiGLU in one launch"). On an
# H200: 8-32 rows 1.6-2.4% faster steps, 64 rows 1.1%; at 48 rows (the 64-row tile) the step was slower or
# unchanged, so it keeps the two launches. 49-128 rows take the TMA kernel (`swiglu_speed.py --tma`: 60.1 us at 64
# rows, 66.4 at 128 against 69.3 for the two launches; the 64 x 1024 and 128 x 512 steps ~1.3% faster).
SWIGLU_DEVICE_CONFIGS: dict[str, tuple[tuple[int, SwigluConfig | None], ...]] = {
    "H200": ((16, (16, 32, 64, 4, 3, 0)), (32, (32, 128, 128, 8, 3, 0)), (48, None), (64, (64, 32, 64, 4, 3, 1)),
             (128, (128, 64, 64, 8, 3, 1))),
}
_DTYPES = (torch.bfloat16, torch.float16)


@lru_cache(maxsize=2)
def _kernels(interpret: bool) -> SimpleNamespace:
    """The kernel (`gemm`), built per interpret mode (Triton reads TRITON_INTERPRET when it decorates)."""
    import triton
    import triton.language as tl

    # A batch's row count is not specialized on (divisible by 16 or not): one compiled variant per BLOCK_M serves
    # every row count the start-up warm-up's prompts reach, so none compiles while serving.
    @triton.jit(do_not_specialize=["M"])
    def swiglu_gemm_kernel(x_ptr, w_ptr, out_ptr, M, INTER, K, sx_m,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           LIBDEVICE_EXP: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
                           STORE: tl.constexpr):
        # x [M, K] (rows sx_m apart), w [2 INTER, K] contiguous (gate rows, then up rows), out [M, INTER]
        # contiguous; grid (cdiv(INTER, BLOCK_N), cdiv(M, BLOCK_M)).
        if PDL:  # pdl.pdl_release: launched while the RMSNorm computing x ends; x is read after this
            tl.extra.cuda.gdc_wait()
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < INTER
        x = x_ptr + rm[:, None].to(tl.int64) * sx_m + rk[None, :]
        gate_w = w_ptr + rn[None, :].to(tl.int64) * K + rk[:, None]  # [BLOCK_K, BLOCK_N]
        up_w = gate_w + INTER.to(tl.int64) * K
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = rk < K - k0
            xv = tl.load(x, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            gate_t = tl.load(gate_w, mask=w_mask, other=0.0)
            up_t = tl.load(up_w, mask=w_mask, other=0.0)
            if DOT_F32:  # the interpreter multiplies bf16 tiles wrongly; widened, the products are the same
                xv = xv.to(tl.float32)
                gate_t = gate_t.to(tl.float32)
                up_t = up_t.to(tl.float32)
            gate = tl.dot(xv, gate_t, gate, input_precision="ieee")  # float32 tiles: no TF32 rounding
            up = tl.dot(xv, up_t, up, input_precision="ieee")
            x += BLOCK_K
            gate_w += BLOCK_K
            up_w += BLOCK_K
        if PDL:  # the down projection after this (model/decode_gemm.py) may start loading its weight
            tl.extra.cuda.gdc_launch_dependents()
        STORE(gate, up, out_ptr, rm, rn, M, INTER, LIBDEVICE_EXP)

    # x and the gate and up tiles each one TMA copy into shared memory through host-made descriptors (rows past M
    # read as zeros; a gate tile past INTER reads up rows, whose columns the store masks), STAGES of them in flight,
    # the products warpgroup MMAs; the same sums and rounding as swiglu_gemm_kernel.
    @triton.jit(do_not_specialize=["M"])
    def swiglu_tma_kernel(x_desc, w_desc, out_ptr, M, INTER, K,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          STAGES: tl.constexpr, LIBDEVICE_EXP: tl.constexpr, DOT_F32: tl.constexpr,
                          PDL: tl.constexpr, STORE: tl.constexpr):
        m0 = tl.program_id(1) * BLOCK_M
        n0 = tl.program_id(0) * BLOCK_N
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            xv = x_desc.load([m0, k0])
            gate_t = w_desc.load([n0, k0])
            up_t = w_desc.load([INTER + n0, k0])
            if DOT_F32:
                xv = xv.to(tl.float32)
                gate_t = gate_t.to(tl.float32)
                up_t = up_t.to(tl.float32)
            gate = tl.dot(xv, gate_t.T, gate, input_precision="ieee")
            up = tl.dot(xv, up_t.T, up, input_precision="ieee")
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        STORE(gate, up, out_ptr, m0 + tl.arange(0, BLOCK_M), n0 + tl.arange(0, BLOCK_N), M, INTER, LIBDEVICE_EXP)

    # Handed to both kernels as STORE (the interpreter finds no closures): the gate and up products rounded to the
    # dtype, silu(gate) rounded, the product rounded, for rows rm and columns rn.
    @triton.jit
    def store_swiglu(gate, up, out_ptr, rm, rn, M, INTER, LIBDEVICE_EXP: tl.constexpr):
        dtype = out_ptr.dtype.element_ty
        gate = gate.to(dtype).to(tl.float32)
        up = up.to(dtype).to(tl.float32)
        # As fused_ops.silu_and_mul: torch's CUDA silu is x / (1 + expf(-x)), correctly rounded division.
        if LIBDEVICE_EXP:
            e = tl.extra.cuda.libdevice.exp(-gate)
        else:
            e = tl.exp(-gate)  # the interpreter has no libdevice
        silu = tl.math.div_rn(gate, 1.0 + e).to(dtype).to(tl.float32)
        out = out_ptr + rm[:, None].to(tl.int64) * INTER + rn[None, :]
        tl.store(out, (silu * up).to(dtype), mask=(rm < M)[:, None] & (rn < INTER)[None, :])

    return SimpleNamespace(gemm=swiglu_gemm_kernel, tma_gemm=swiglu_tma_kernel, store=store_swiglu)


def config_for(name: str, rows: int) -> SwigluConfig | None:
    """SWIGLU_DEVICE_CONFIGS's launch for `rows` rows on the device torch names `name`; None: cuBLAS."""
    table = device_entry(SWIGLU_DEVICE_CONFIGS, name, ())
    return next((config for max_rows, config in table if rows <= max_rows), None)


def swiglu_setting() -> str:
    """PDLAUNCH_SWIGLU: `auto` (unset or empty) or `cublas`; any other value is refused naming the variable."""
    return env_choice("PDLAUNCH_SWIGLU", ("auto", "cublas"))


def swiglu_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when silu(x W_gate^T) * (x W_up^T) runs as one launch: 2+ rows of fp16/bf16 on CUDA with a contiguous
    gate_up weight of x's dtype and a measured launch for that many rows on this device."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] >= 2 and x.dtype in _DTYPES and weight.dtype == x.dtype
            and weight.dim() == 2 and weight.is_contiguous() and weight.shape[0] % 2 == 0
            and x.stride(1) == 1 and swiglu_setting() != "cublas"
            and triton_importable() and config_for(device_name(x.device.index or 0), x.shape[0]) is not None)


def swiglu_gemm(x: torch.Tensor, weight: torch.Tensor, config: SwigluConfig | None = None) -> torch.Tensor:
    """x [M, K] and the gate_up weight [2I, K] -> silu(x W[:I]^T) * (x W[I:]^T) [M, I] in x's dtype, rounded as
    F.linear followed by fused_ops.silu_and_mul. `config` overrides the device table (benchmarks, tests)."""
    import triton

    rows, k = x.shape
    if weight.shape[1] != k or weight.shape[0] % 2:
        raise ValueError(f"swiglu_gemm: x [{rows}, {k}] does not pair with a gate_up weight {tuple(weight.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    inter = weight.shape[0] // 2
    if config is None:
        config = config_for(device_name(x.device.index or 0), rows) if x.is_cuda else None
    if config is None:
        raise ValueError(f"swiglu_gemm: no launch for {rows} rows on this device (check swiglu_available first)")
    block_m, block_n, block_k, warps, stages, tma = config
    out = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    interpret = interpret_mode()
    pdl = pdl_release(x, rows)
    grid = (triton.cdiv(inter, block_n), triton.cdiv(rows, block_m))
    kernels = _kernels(interpret)
    common = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, LIBDEVICE_EXP=not interpret, DOT_F32=interpret,
                  PDL=pdl, STORE=kernels.store, num_warps=warps, num_stages=stages, enable_fp_fusion=False,
                  **pdl_kwargs(pdl))
    if tma and tma_aligned(x, weight):
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor(x, [rows, k], [x.stride(0), 1], [block_m, block_k])
        w_desc = TensorDescriptor(weight, [2 * inter, k], [k, 1], [block_n, block_k])
        kernels.tma_gemm[grid](x_desc, w_desc, out, rows, inter, k, STAGES=stages, **common)
    else:
        kernels.gemm[grid](x, weight, out, rows, inter, k, x.stride(0), **common)
    return out


def swiglu_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The two-launch semantics swiglu_gemm reproduces: the gate_up product, then silu(gate) * up, each op rounded
    to x's dtype."""
    return silu_and_mul_torch(torch.nn.functional.linear(x, weight))
