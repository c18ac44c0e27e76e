"""Where the package's Triton kernels run: whether Triton imports, whether it runs its CPU interpreter, and the
CUDA device a launch is for (its compute capability, its name, the entry of a per-device launch table)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from typing import TypeVar

import torch


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1). Triton 3.4 and newer say so
    through `triton.knobs`; before (torch 2.4-2.7 ship Triton 3.0-3.3) only the variable does."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=8)
def capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


T = TypeVar("T")


def device_entry(table: Mapping[str, T], name: str, default: T) -> T:
    """The entry of a per-device launch table whose key (a substring of torch's device name) `name` contains, the
    first in the table's order; `default` where none does."""
    return next((entry for key, entry in table.items() if key in name), default)


@lru_cache(maxsize=8)
def device_name(device_index: int) -> str:
    """torch's name of CUDA device `device_index`, looked up once: the key of the per-device launch tables
    (gemv.GEMV_DEVICE_CONFIGS, quant/block_gemv.GEMV_SHAPE_CONFIGS), read on every eager one-row projection."""
    return torch.cuda.get_device_name(device_index)
