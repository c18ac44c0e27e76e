"""Which BLAS library torch's bf16/fp16 matrix products go through on CUDA: PDLAUNCH_BLAS.

Unset or `cublas`: torch's default. `cublaslt`: torch.backends.cuda.preferred_blas_library("cublaslt") for every
product, which sends plain products through cuBLASLt's heuristics too. `cublaslt-decode`: cuBLASLt only while the
decode step's CUDA graphs are captured (runner/cuda_graphs.py; a replayed graph keeps the kernels it captured), and
torch's default everywhere else, prefill included. On one H100 every product through cuBLASLt made the 8B decode
steps 1-3% faster (128 x 512 9.71-9.75 ms against 9.97-10.02) and its 4096-token prefill 1.5-3% slower (RESULTS.md,
forty-fourth and forty-fifth sessions): hence the decode-only scope. Set it in an instance's environment (e.g.
`PDLAUNCH_BLAS=cublaslt-decode pdlaunch serve ...`) to compare a deployment both ways.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from pdlaunch.errors import PdlaunchError

ENV = "PDLAUNCH_BLAS"
CHOICES = ("cublas", "cublaslt", "cublaslt-decode")
DECODE_ONLY = "cublaslt-decode"

log = logging.getLogger(__name__)


def blas_setting(environ: Mapping[str, str] = os.environ) -> str:
    """PDLAUNCH_BLAS as one of CHOICES, or "" when unset; any other value is refused naming the variable."""
    value = environ.get(ENV, "").strip().lower()
    if value and value not in CHOICES:
        raise PdlaunchError(f"{environ[ENV]!r} is not a BLAS library pdlaunch can select", field=ENV,
                            hint=f"one of {', '.join(CHOICES)}, or unset for torch's default")
    return value


def select_blas_library(device: torch.device, environ: Mapping[str, str] = os.environ) -> str | None:
    """Apply PDLAUNCH_BLAS for a model on `device`; returns the setting in force (None: torch's default, or not
    CUDA). `cublaslt-decode` changes nothing here: `decode_capture_blas` applies it around the decode graphs."""
    value = blas_setting(environ)
    if not value or device.type != "cuda":
        return None
    if value != DECODE_ONLY:
        torch.backends.cuda.preferred_blas_library(value)
    log.info("%s=%s: torch's matrix products %s", ENV, value,
             "captured in decode graphs through cuBLASLt" if value == DECODE_ONLY else "through it")
    return value


@contextmanager
def decode_capture_blas(device: torch.device, environ: Mapping[str, str] = os.environ) -> Iterator[str | None]:
    """Around the capture of the decode step's CUDA graphs (their warm-up runs included): with
    PDLAUNCH_BLAS=cublaslt-decode on CUDA, torch's products go through cuBLASLt, and the library before is restored
    on the way out, however the capture ends. Yields the library in force for the capture (None: unchanged)."""
    if device.type != "cuda" or blas_setting(environ) != DECODE_ONLY:
        yield None
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        yield "cublaslt"
    finally:
        torch.backends.cuda.preferred_blas_library(before)
