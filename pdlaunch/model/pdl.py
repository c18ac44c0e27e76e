"""Programmatic dependent launch (PDL, CUDA sm_90 and newer): which of the package's Triton kernels launch dependent
on the kernel before them in the stream (`pdl_enabled`), which let the kernel after them start early without
being launched so (`pdl_release`), and the launch keyword that asks for it (`pdl_kwargs`)."""

from __future__ import annotations

from functools import lru_cache

import torch

from pdlaunch.model.overrides import env_choice
from pdlaunch.model.triton_env import capability, interpret_mode


def pdl_enabled(t: torch.Tensor, rows: int) -> bool:
    """True when a kernel computing `rows` token rows on `t`'s device launches with programmatic dependent
    launch (CUDA, sm_90 or newer): its programs may start while the kernel before it in the stream finishes, do
    what needs none of that kernel's output (load weights), then wait for it (`gdc_wait`) before touching
    anything it wrote. Every kernel launched so waits, and lets the next one start only after its own wait, so
    when a kernel starts, all but the one before it have finished.

    One row only: the batch-1 decode step, where every kernel is ours and each is short, so the launch gaps were
    a tenth of the step (H200, 8B shape, 1 x 128: 4.41 -> 4.11 ms). From two rows the projections run through
    cuBLAS, whose GEMMs let the next kernel start early; ours then waited on SMs the GEMM still needed (H200,
    48 x 3072: 9.54 -> 9.82 ms). From two rows only the GEMMs that follow a kernel releasing them
    (`pdl_release`) launch dependent. PDLAUNCH_PDL=off turns it off (debugging, benchmarks); PDLAUNCH_PDL=all
    launches every kernel of ours dependent at any row count (A/B runs)."""
    return t.is_cuda and (rows == 1 or pdl_setting() == "all") and _pdl_device(t)


def pdl_setting() -> str:
    """PDLAUNCH_PDL: `auto` (unset or empty), `off` or `all` (pdl_enabled); any other value is refused naming the
    variable."""
    return env_choice("PDLAUNCH_PDL", ("auto", "off", "all"))


def pdl_release(t: torch.Tensor, rows: int) -> bool:
    """True when a kernel computing a decode batch of `rows` (two or more) token rows on `t`'s device lets the
    kernel after it start early, without itself being launched dependent: the RMSNorm before a batch's SwiGLU GEMM
    (model/swiglu.py) or projection GEMM (model/decode_gemm.py), the paged decode before the o projection, the
    SwiGLU GEMM before the down projection. Those GEMMs are launched dependent (on this same condition) and wait
    for the kernel before them before reading x. A kernel not launched dependent (cuBLAS's GEMMs) ignores the
    release. PDLAUNCH_PDL=off turns it off with the batch-1 launches."""
    return rows > 1 and _pdl_device(t)


def _pdl_device(t: torch.Tensor) -> bool:
    """`t`'s device can launch dependent kernels (CUDA sm_90 or newer, a Triton with the launch option, compiled
    kernels) and PDLAUNCH_PDL is not off."""
    return (t.is_cuda and pdl_setting() != "off"
            and capability(t.device.index or 0) >= (9, 0) and _triton_has_pdl() and not interpret_mode())


def pdl_kwargs(pdl: bool) -> dict[str, bool]:
    """The launch keyword for a dependent launch, and none for a plain one: a Triton without the option (before
    3.3) rejects launch keywords it does not know."""
    return {"launch_pdl": True} if pdl else {}


@lru_cache(maxsize=1)
def _triton_has_pdl() -> bool:
    """The installed Triton has the launch option and the two instructions (3.3 and newer)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda
    except ImportError:
        return False
    return ("launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
            and hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents"))
