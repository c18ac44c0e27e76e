"""Which BLAS library torch's bf16/fp16 matrix products go through on CUDA: PDLAUNCH_BLAS.

- `auto` (the default, also when unset): DEVICE_DEFAULTS's setting for the GPU (a substring of torch's device
  name), torch's default elsewhere.
- `cublas`: torch's default.
- `cublaslt`: torch.backends.cuda.preferred_blas_library("cublaslt") for every product, which sends plain
  products through cuBLASLt's heuristics too.
- `cublaslt-decode`: cuBLASLt only while the decode step's CUDA graphs are captured (runner/cuda_graphs.py; a
  replayed graph keeps the kernels it captured), torch's default everywhere else, prefill included.

On one H100, every product through cuBLASLt made the 8B decode steps 1-3% faster (128 x 512 9.71-9.75 ms against
9.95-10.02) and its 4096-token prefill 1.5-3% slower; the decode-only scope kept the decode gain (four passes in
two calls, every cell: 128 x 512 9.71-9.75 against 9.95-10.02 ms, 48 x 3072 12.75-12.79 against 12.90-12.92)
and left the prefill alone (RESULTS.md, forty-fourth and forty-fifth sessions). Hence the H100's default. On
one H200 (two passes, forty-sixth session) it made 48 x 3072 1.0-1.2% faster and 128 x 512 0.6-1.0%, and
64 x 1024 moved within +-0.3% (noise): the H200's default too. Other GPUs keep torch's default. Set the
variable in an instance's environment (e.g. `PDLAUNCH_BLAS=cublas pdlaunch serve ...`) to compare a deployment
both ways.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.triton_env import device_entry, device_name

ENV = "PDLAUNCH_BLAS"
AUTO = "auto"
DECODE_ONLY = "cublaslt-decode"
CHOICES = (AUTO, "cublas", "cublaslt", DECODE_ONLY)
# What `auto` means per device (a substring of torch's device name), measured with benchmarks/blas_round.sh.
DEVICE_DEFAULTS: dict[str, str] = {"H100": DECODE_ONLY, "H200": DECODE_ONLY}

log = logging.getLogger(__name__)


def blas_setting(environ: Mapping[str, str] = os.environ) -> str:
    """PDLAUNCH_BLAS as one of CHOICES, in any case and with spaces around it (unset or blank: `auto`); any other
    value is refused naming the variable."""
    value = environ.get(ENV, "").strip().lower() or AUTO
    if value not in CHOICES:
        raise PdlaunchError(f"{environ[ENV]!r} is not a BLAS library pdlaunch can select", field=ENV,
                            hint=f"one of {', '.join(CHOICES)}, or unset for {AUTO}")
    return value


def resolved_setting(device: torch.device, environ: Mapping[str, str] = os.environ,
                     name: str | None = None) -> str:
    """The setting in force for a model on `device`: `cublas`, `cublaslt` or `cublaslt-decode` (`auto` resolved
    by DEVICE_DEFAULTS for the device named `name`, default torch's name of `device`); `cublas` off CUDA."""
    value = blas_setting(environ)
    if device.type != "cuda":
        return "cublas"
    if value == AUTO:
        value = device_entry(DEVICE_DEFAULTS, name if name is not None else device_name(device.index or 0), "cublas")
    return value


def select_blas_library(device: torch.device, environ: Mapping[str, str] = os.environ) -> str | None:
    """Apply PDLAUNCH_BLAS for a model on `device`; returns the setting in force (None: `auto` left torch's
    library as it is, or not CUDA). An explicit `cublas` sets torch's default again (a process may have changed
    it); `cublaslt-decode` changes nothing here: `decode_capture_blas` applies it around the decode graphs."""
    value = resolved_setting(device, environ)
    if device.type != "cuda" or (value == "cublas" and blas_setting(environ) == AUTO):
        return None
    if value != DECODE_ONLY:
        torch.backends.cuda.preferred_blas_library(value)
    log.info("%s: %s (torch's matrix products %s)", ENV, value,
             "captured in decode graphs through cuBLASLt" if value == DECODE_ONLY else "through it")
    return value


@contextmanager
def decode_capture_blas(device: torch.device, environ: Mapping[str, str] = os.environ) -> Iterator[str | None]:
    """Around the capture of the decode step's CUDA graphs (their warm-up runs included): where the setting in
    force is `cublaslt-decode`, torch's products go through cuBLASLt, and the library before is restored on the
    way out, however the capture ends. Yields the library in force for the capture (None: unchanged)."""
    if resolved_setting(device, environ) != DECODE_ONLY:
        yield None
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        yield "cublaslt"
    finally:
        torch.backends.cuda.preferred_blas_library(before)
