"""Which BLAS library torch's bf16/fp16 matrix products go through on CUDA: PDLAUNCH_BLAS.

Unset or `cublas`: torch's default. `cublaslt`: torch.backends.cuda.preferred_blas_library("cublaslt"), which
sends plain products through cuBLASLt's heuristics too. On one H100 that made the 8B decode steps 1-2% faster
(128 x 512 9.71-9.72 ms against 9.90; 64 x 1024 9.25-9.28 against 9.41; RESULTS.md, forty-fourth session); the
prefill steps and the H200 were not measured, so the default stays torch's. Set it in an instance's environment
(e.g. `PDLAUNCH_BLAS=cublaslt pdlaunch serve ...`) to compare a deployment both ways.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from pdlaunch.errors import PdlaunchError

ENV = "PDLAUNCH_BLAS"
CHOICES = ("cublas", "cublaslt")

log = logging.getLogger(__name__)


def select_blas_library(device: torch.device, environ: Mapping[str, str] = os.environ) -> str | None:
    """Apply PDLAUNCH_BLAS for a model on `device`; returns the library chosen (None: torch's default, or
    not CUDA). A value other than CHOICES is refused naming the variable, on any device."""
    value = environ.get(ENV, "").strip().lower()
    if value and value not in CHOICES:
        raise PdlaunchError(f"{environ[ENV]!r} is not a BLAS library pdlaunch can select", field=ENV,
                            hint=f"one of {', '.join(CHOICES)}, or unset for torch's default")
    if not value or device.type != "cuda":
        return None
    torch.backends.cuda.preferred_blas_library(value)
    log.info("%s=%s: torch's matrix products through it", ENV, value)
    return value
