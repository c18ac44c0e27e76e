"""A decode batch's projections y = x W^T (+ b) at 2-64 rows on CUDA, as a Triton GEMM launched dependent (the
kernels take up to 128 rows; at 128 no launch beat cuBLAS, so the table stops at 64).

From two rows the qkv, o and down projections of a decode step ran through cuBLAS. Its kernels let the next one
start early, but they are not launched dependent themselves: each starts only once the kernel before it has ended
and pays its ramp (the first weight tiles' round trip to memory) after that. On an H200 at 64 rows they read at
1.28-1.45x of their weight bytes (benchmarks/RESULTS.md, "Where 64 x 1024 still loses"). Here the kernel
(decode_gemm_kernels.py) loads its first weight tile before it waits for x, splits K where its N tiles alone leave
SMs idle, and lets the next kernel start when its loop is done. A launch whose TMA field is 1 reads every tile
through the tensor-memory accelerator (`tma_gemm_kernel`): at 64-128 rows it streams no faster than the pointer
kernel by more than ~1 us a call, and loses to cuBLAS for o and down at 128 rows (RESULTS.md, "TMA").

Used only where a per-device table (`DECODE_GEMM_DEVICE_CONFIGS`, measured with benchmarks/decode_gemm_speed.py)
has a launch for the rows and the weight's shape; elsewhere, and with PDLAUNCH_DECODE_GEMM=cublas, F.linear runs
as before.
"""

from __future__ import annotations

import torch

from pdlaunch.model.decode_gemm_kernels import kernels_for
from pdlaunch.model.overrides import env_choice
from pdlaunch.model.pdl import pdl_kwargs, pdl_release
from pdlaunch.model.triton_env import device_entry, device_name, interpret_mode, triton_importable

# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, SWAP, TMA): SWAP 1 multiplies W x^T (the weight tile as the
# MMA's M side), 0 x W^T; TMA 1 reads the tiles through the tensor-memory accelerator (`tma_gemm_kernel`; where x or
# the weight is not 16-byte aligned as TMA needs, the same launch runs the pointer kernel).
DecodeGemmConfig = tuple[int, int, int, int, int, int, int]
# Per device (a substring of torch's device name): (largest rows, largest N, largest K, config or None), the first
# entry that covers the call; None, or no entry: F.linear. BLOCK_M is the rows rounded up to a power of two (16 at
# least). Ordered by rows, then N, then K, so each measured shape takes its own launch and another takes that of
# the next larger one. Measured with benchmarks/decode_gemm_speed.py on one H200 (Llama-3-8B's qkv, o and down,
# Qwen3-30B-A3B's qkv and o; benchmarks/RESULTS.md, "A decode batch's projections launched dependent"): the fastest
# launch at 16, 32 and 64 rows where it beat cuBLAS, e.g. o at 16 rows 11.3 against 12.8 us, down at 64 rows 33.7
# against 35.6; whole decode steps 1.2-1.4% faster at 16-64 x 1024 (0.8% at 8). Llama-3-8B's qkv at 49-64 rows takes
# the TMA kernel (15.3 against cuBLAS's 15.9 us; benchmarks/tma_gemm_speed.py). Llama-3-8B's qkv up to 48 rows and
# o at 64, and Qwen3-30B-A3B's qkv from 17 rows, stay on cuBLAS, which was faster or level there.
DECODE_GEMM_DEVICE_CONFIGS: dict[str, tuple[tuple[int, int, int, DecodeGemmConfig | None], ...]] = {
    "H200": (
        (16, 2048, 4096, (64, 128, 4, 4, 6, 1, 0)), (16, 4096, 4096, (32, 128, 1, 4, 6, 0, 0)),
        (16, 4096, 14336, (64, 256, 2, 4, 4, 1, 0)), (16, 5120, 2048, (64, 128, 1, 4, 6, 1, 0)),
        (16, 6144, 4096, (64, 128, 1, 4, 6, 1, 0)),
        (32, 2048, 4096, (64, 128, 4, 4, 4, 1, 0)), (32, 4096, 4096, (64, 128, 2, 4, 4, 1, 0)),
        (32, 4096, 14336, (32, 256, 1, 4, 6, 0, 0)), (32, 5120, 2048, None), (32, 6144, 4096, (64, 128, 1, 4, 6, 1, 0)),
        (48, 5120, 2048, None), (48, 6144, 4096, None),
        (64, 2048, 4096, (32, 128, 2, 4, 6, 0, 0)), (64, 4096, 4096, None), (64, 4096, 14336, (32, 128, 1, 4, 6, 0, 0)),
        (64, 5120, 2048, None), (64, 6144, 4096, (64, 128, 1, 4, 6, 0, 1)),
    ),
}
MAX_ROWS = 128  # the kernel takes up to 128; the table has launches up to 64 (at 128 none beat cuBLAS: RESULTS)
_DTYPES = (torch.bfloat16, torch.float16)


def block_m(rows: int) -> int:
    """The M tile of a call of `rows` rows: the rows rounded up to a power of two, 16 at least."""
    return max(16, 1 << (rows - 1).bit_length())


def config_for(name: str, rows: int, n: int, k: int) -> DecodeGemmConfig | None:
    """DECODE_GEMM_DEVICE_CONFIGS's launch for `rows` rows of a weight [n, k] on the device torch names `name`;
    None: F.linear."""
    table = device_entry(DECODE_GEMM_DEVICE_CONFIGS, name, ())
    return next((config for max_rows, max_n, max_k, config in table
                 if rows <= max_rows and n <= max_n and k <= max_k), None)


def tma_aligned(*tensors: torch.Tensor) -> bool:
    """True when each 2-D tensor (unit column stride) can be read through a TMA descriptor: its start and its row
    stride in bytes multiples of 16."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)


def decode_gemm_setting() -> str:
    """PDLAUNCH_DECODE_GEMM: `auto` (unset or empty) or `cublas`; any other value is refused naming the variable."""
    return env_choice("PDLAUNCH_DECODE_GEMM", ("auto", "cublas"))


def decode_gemm_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when x W^T runs this GEMM: 2 to MAX_ROWS rows of fp16/bf16 on CUDA, a contiguous weight of x's dtype,
    and a measured launch for the rows and the weight's shape on this device."""
    return (x.is_cuda and x.dim() == 2 and 2 <= x.shape[0] <= MAX_ROWS and x.dtype in _DTYPES
            and weight.dtype == x.dtype and weight.dim() == 2 and weight.is_contiguous() and x.stride(1) == 1
            and decode_gemm_setting() != "cublas" and triton_importable()
            and config_for(device_name(x.device.index or 0), x.shape[0], *weight.shape) is not None)


def decode_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: DecodeGemmConfig | None = None) -> torch.Tensor:
    """x [M, K] times weight [N, K] (+ bias [N]) -> [M, N] in x's dtype, M <= MAX_ROWS. `config` overrides the
    device table (benchmarks, tests)."""
    import triton

    from pdlaunch.model.split_counters import split_counters  # layering: lazy, like the kernels

    rows, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"decode_gemm: x has {k} columns for a weight {tuple(weight.shape)}")
    if rows > MAX_ROWS:
        raise ValueError(f"decode_gemm: x has {rows} rows; it takes at most {MAX_ROWS} rows")
    if x.stride(1) != 1:
        x = x.contiguous()
    if config is None:
        config = config_for(device_name(x.device.index or 0), rows, n, k) if x.is_cuda else None
    if config is None:
        raise ValueError(f"decode_gemm: no launch for {rows} rows of a [{n}, {k}] weight on this device "
                         "(check decode_gemm_available first)")
    block_n, block_k, split, warps, stages, swap, tma = config
    k_blocks = triton.cdiv(k, block_k)
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(k, k_per_split)  # ranges that hold any columns
    bm = block_m(rows)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(n, block_n)
    part, counters = out, out  # unread with one range
    if split > 1:
        part = torch.empty(split, bm, n, dtype=torch.float32, device=x.device)
        counters = split_counters(x.device, tiles)
    interpret = interpret_mode()
    # Launched dependent wherever the kernel before may release it early (a decode batch on sm_90+).
    pdl = pdl_release(x, rows)
    kernels = kernels_for(interpret)
    bias_arg = bias if bias is not None else out
    if tma and tma_aligned(x, weight):
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor(x, [rows, k], [x.stride(0), 1], [bm, block_k])
        w_desc = TensorDescriptor(weight, [n, k], [k, 1], [block_n, block_k])
        kernels.tma_gemm[(tiles, split)](
            x_desc, w_desc, bias_arg, out, part, counters, rows, n, k, k_per_split,
            BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, SWAP=bool(swap), HAS_BIAS=bias is not None,
            DOT_F32=interpret, STAGES=stages, PDL=pdl, STORE=kernels.split_store, num_warps=warps,
            num_stages=stages, **pdl_kwargs(pdl))
        return out
    kernels.gemm[(tiles, split)](
        x, weight, bias_arg, out, part, counters, rows, n, k, x.stride(0), k_per_split,
        BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, SWAP=bool(swap),
        EVEN_K=k % block_k == 0 and k_per_split % block_k == 0, HAS_BIAS=bias is not None, DOT_F32=interpret,
        PDL=pdl, STORE=kernels.split_store, num_warps=warps, num_stages=stages, **pdl_kwargs(pdl))
    return out

