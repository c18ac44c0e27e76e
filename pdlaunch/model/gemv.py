"""One-row products y = x W^T (+ b) on CUDA: the projections of a batch-1 decode step, as a Triton GEMV.

At one row cuBLAS picks GEMV-like kernels that read the Llama-3-8B shape's qkv at 82% and o + down at 86% of the
copy rate on an H100 (down and o split over K, then a separate reduction launch: 110 us a step); the weight is
all the step reads, so the step is those ratios. Here each program streams BLOCK_N whole weight rows, BLOCK_K
columns per loop iteration, multiplying by x in float32 and summing once at the end: no split, no second launch.
Used for bf16/fp16 weights and one row only (`gemv_available`); from two rows cuBLAS's GEMMs read each weight tile
once for every row and stay. PDLAUNCH_GEMV=cublas turns it off (benchmarks, debugging).

On Hopper the GEMV launches dependent on the kernel before it (pdl.pdl_enabled): its programs start
while that kernel (the RMSNorm computing x, usually) ends, and load their first weight columns before they wait
for x. Weights are written only by loading and waking, never by the kernel right before a projection.
"""

from __future__ import annotations

import os
from functools import lru_cache
from types import SimpleNamespace

import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.overrides import env_choice, whole_number
from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs
from pdlaunch.model.triton_env import device_entry, device_name, triton_importable

GemvConfig = tuple[int, int, int]  # (BLOCK_N, BLOCK_K, num_warps)
# 8 weight rows x 512 columns (8 KiB of bf16) a loop iteration, 4 warps (benchmarks/gemv_speed.py).
GEMV_CONFIG: GemvConfig = (8, 512, 4)
# Per device (a substring of torch's device name): (largest N, largest K, config), the first entry that covers the
# weight's N and K; larger weights and other devices take GEMV_CONFIG. Measured with benchmarks/gemv_speed.py,
# kernels launched as in a decode step (benchmarks/RESULTS.md, "Kernels that start while the one before ends" and
# "Batch-1 steps without the layout launch"): e.g. on an H200 Qwen3-30B-A3B's qkv (5120 x 2048) took 6.30 us as
# 4 x 512 against 6.88 as 8 x 1024, while Llama-3-8B's (6144 x 4096) took 13.49 as 8 x 1024 against 16.13.
_ANY = 1 << 62
GEMV_DEVICE_CONFIGS: dict[str, tuple[tuple[int, int, GemvConfig], ...]] = {
    "H200": ((2048, _ANY, (8, 1024, 8)), (4096, _ANY, (4, 512, 4)), (8192, 2048, (4, 512, 4)),
             (8192, _ANY, (8, 1024, 8)), (_ANY, _ANY, (16, 256, 4))),
    "H100": ((2048, _ANY, (8, 1024, 8)), (4096, _ANY, (4, 512, 4)), (_ANY, _ANY, (8, 1024, 8))),
}
_DTYPES = (torch.bfloat16, torch.float16)


@lru_cache(maxsize=1)
def _kernels() -> SimpleNamespace:
    """The GEMV kernel (`gemv`) and its x loader (`x_chunk`), which it takes as a constexpr."""
    import triton
    import triton.language as tl

    @triton.jit
    def x_chunk(x_ptr, y_ptr, K, k0, rk, k_ok, SILU_MUL: tl.constexpr):
        # x's columns k0 + rk in float32. SILU_MUL: x is [1, 2K] = (gate, up) and the row multiplied is
        # silu(gate) * up, rounded as fused_ops.silu_and_mul rounds it (silu to the dtype, then the product), so
        # the result equals silu_and_mul followed by the plain GEMV bit for bit.
        dtype = x_ptr.dtype.element_ty
        if SILU_MUL:
            gate = tl.load(x_ptr + k0 + rk, mask=k_ok, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + k0 + rk, mask=k_ok, other=0.0).to(tl.float32)
            silu = tl.math.div_rn(gate, 1.0 + tl.extra.cuda.libdevice.exp(-gate)).to(dtype).to(tl.float32)
            return (silu * up).to(dtype).to(tl.float32)
        return tl.load(x_ptr + k0 + rk, mask=k_ok, other=0.0).to(tl.float32)

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, X_CHUNK: tl.constexpr):
        # PDL (pdl.pdl_enabled): the first BLOCK_K columns of the weight rows load while the kernel
        # before, which computes x, still runs; x is read after gdc_wait. X_CHUNK is x_chunk, handed over as a
        # constexpr because the kernels are built in this function.
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        w = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
        k_ok = rk < K
        w_first = tl.load(w, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = w_first.to(tl.float32) * X_CHUNK(x_ptr, y_ptr, K, 0, rk, k_ok, SILU_MUL)[None, :]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            w += BLOCK_K
            k_ok = rk < K - k0
            wv = tl.load(w, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += wv.to(tl.float32) * X_CHUNK(x_ptr, y_ptr, K, k0, rk, k_ok, SILU_MUL)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    return SimpleNamespace(gemv=gemv_kernel, x_chunk=x_chunk)


def config_for(device_name: str, n: int, k: int) -> GemvConfig:
    """GEMV_DEVICE_CONFIGS's launch for a weight of `n` rows and `k` columns on the device torch names
    `device_name`, unless PDLAUNCH_GEMV_CONFIG names one for that shape (config_override)."""
    override = config_override(os.environ.get("PDLAUNCH_GEMV_CONFIG", "")).get((n, k))
    if override is not None:
        return override
    table = device_entry(GEMV_DEVICE_CONFIGS, device_name, ())
    return next((config for max_n, max_k, config in table if n <= max_n and k <= max_k), GEMV_CONFIG)


@lru_cache(maxsize=8)
def config_override(setting: str) -> dict[tuple[int, int], GemvConfig]:
    """PDLAUNCH_GEMV_CONFIG, `NxK=BLOCK_N,BLOCK_K,WARPS` entries joined by `:` (e.g. `5120x2048=4,512,4`): the launch
    for a weight of exactly N rows and K columns, in place of the table's, so a benchmark can time a launch inside
    whole steps before it goes into GEMV_DEVICE_CONFIGS (benchmarks/moe_speed.py --variants). Powers of two."""
    configs: dict[tuple[int, int], GemvConfig] = {}
    for entry in filter(None, setting.split(":")):
        shape, _, launch = entry.partition("=")
        numbers = [part.strip() for part in shape.split("x")] + [part.strip() for part in launch.split(",")]
        if len(numbers) != 5 or not all(whole_number(part) for part in numbers):
            raise PdlaunchError(f"PDLAUNCH_GEMV_CONFIG: {entry!r} is not NxK=BLOCK_N,BLOCK_K,WARPS",
                                field="PDLAUNCH_GEMV_CONFIG", hint="e.g. 5120x2048=4,512,4 (entries joined by ':')")
        n, k, block_n, block_k, warps = (int(part) for part in numbers)
        if n < 1 or k < 1:  # no weight has that shape: the override would never apply
            raise PdlaunchError(f"PDLAUNCH_GEMV_CONFIG: {entry!r}: N and K must be 1 or more",
                                field="PDLAUNCH_GEMV_CONFIG", hint="e.g. 5120x2048=4,512,4")
        if any(v < 1 or v & (v - 1) for v in (block_n, block_k, warps)):
            raise PdlaunchError(f"PDLAUNCH_GEMV_CONFIG: {entry!r}: BLOCK_N, BLOCK_K and WARPS must be powers of two",
                                field="PDLAUNCH_GEMV_CONFIG", hint="e.g. 5120x2048=4,512,4")
        configs[(n, k)] = (block_n, block_k, warps)
    return configs


def gemv_setting() -> str:
    """PDLAUNCH_GEMV: `auto` (unset or empty) or `cublas`; any other value is refused naming the variable."""
    return env_choice("PDLAUNCH_GEMV", ("auto", "cublas"))


def gemv_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when x W^T runs the GEMV: one row of fp16/bf16 on CUDA, a contiguous weight of x's dtype."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in _DTYPES and weight.dtype == x.dtype
            and weight.dim() == 2 and weight.is_contiguous() and gemv_setting() != "cublas"
            and triton_importable())


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None, silu_mul: bool = False, out_dtype: torch.dtype | None = None
         ) -> torch.Tensor:
    """x [1, K] times weight [N, K] (+ bias [N]) -> [1, N] in `out_dtype` (default x's dtype; float32 stores the
    float32 sum unrounded). silu_mul: x is [1, 2K], the (gate, up) halves of a gate_up projection, and the row
    multiplied is silu(gate) * up (the SwiGLU's down projection without the separate silu_and_mul launch).
    `config` overrides config_for's choice."""
    import triton

    n, k = weight.shape
    x = x.contiguous()
    if x.shape[1] != (2 * k if silu_mul else k):
        raise ValueError(f"gemv: x has {x.shape[1]} columns for a weight of {k}" + (" (silu_mul)" if silu_mul else ""))
    out = torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device)
    block_n, block_k, warps = config or config_for(device_name(weight.device.index or 0), n, k)
    pdl = pdl_enabled(x, x.shape[0])
    kernels = _kernels()
    kernels.gemv[(triton.cdiv(n, block_n),)](x, weight, bias if bias is not None else out, out, n, k,
                                             HAS_BIAS=bias is not None, SILU_MUL=silu_mul, BLOCK_N=block_n,
                                             BLOCK_K=block_k, PDL=pdl, X_CHUNK=kernels.x_chunk, num_warps=warps,
                                             **pdl_kwargs(pdl))
    return out
