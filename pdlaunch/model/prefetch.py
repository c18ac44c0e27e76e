"""Weights into L2 while the kernel before still runs: a batch-1 decode step's latency-bound kernels (the paged
decode, the norms) leave the memory idle, and the projection after them reads only weights until it waits for x.

A kernel launched dependent (triton_decode.pdl_enabled) may start while the kernel before it runs; before it waits
(`gdc_wait`) it may read what that kernel does not write, its weights among them. Loading them into registers is
bounded by the registers; `prefetch.global.L2` is not: each program asks for its whole weight slice, one 128-byte
line a lane, and streams it from L2 once x is ready. The kernel before must let the next one start early for this
to overlap anything (the paged decode at batch 1 does, `EARLY_RELEASE`).

PDLAUNCH_PREFETCH chooses where (a comma list; `off` for none): `attn` (the batch-1 paged decode lets the next kernel
start right after its wait), `gemv` (a batch-1 GEMV of a weight of at most PREFETCH_MAX_BYTES prefetches it),
`moe` (the batch-1 up GEMM lets the down GEMM start right after its wait, and the down GEMM prefetches its experts'
tiles), `last` (prefetches mark their lines evict-last).
"""

from __future__ import annotations

import os
from functools import lru_cache

PREFETCH_MAX_BYTES = 64 << 20  # a weight this size fits the L2 beside what the kernel before reads
LINE_BYTES = 128
_MODES = ("attn", "gemv", "moe", "last")
DEFAULT_MODES = "off"


def prefetch_modes() -> frozenset[str]:
    """PDLAUNCH_PREFETCH's modes (module doc); unknown names are an error naming the variable."""
    return _parse(os.environ.get("PDLAUNCH_PREFETCH", DEFAULT_MODES))


@lru_cache(maxsize=8)
def _parse(raw: str) -> frozenset[str]:
    modes = frozenset(part.strip() for part in raw.split(",") if part.strip() and part.strip() != "off")
    unknown = sorted(modes - set(_MODES))
    if unknown:
        raise ValueError(f"PDLAUNCH_PREFETCH: unknown mode(s) {', '.join(unknown)}; use off or a comma list of "
                         f"{', '.join(_MODES)}")
    return modes


@lru_cache(maxsize=1)
def l2_prefetch():  # noqa: ANN201 (a triton.JITFunction)
    """The jit helper `l2_prefetch(base, count, LANES, LINE, LAST)`: asks L2 for the `count` elements from `base`,
    one LINE-element line per lane, LANES lanes an iteration (the program's threads), evict-last when LAST.
    Handed to kernels as a constexpr (model/fused_ops.py says why); CUDA only: the interpreter runs no PTX."""
    import triton
    import triton.language as tl

    @triton.jit
    def l2_prefetch_fn(base, count, LANES: tl.constexpr, LINE: tl.constexpr, LAST: tl.constexpr):
        lanes = tl.arange(0, LANES) * LINE
        for off in range(0, count, LANES * LINE):
            ok = (off + lanes < count).to(tl.int32)
            if LAST:
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
                    "=r,l,r", [base + off + lanes, ok], dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                    "=r,l,r", [base + off + lanes, ok], dtype=tl.int32, is_pure=False, pack=1)

    return l2_prefetch_fn
