"""The platform layer: which device, bind it, how much memory. Nothing else hard-codes a device."""

from __future__ import annotations

import os
from functools import lru_cache

import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_count() -> int:
    """Visible CUDA devices (0 without CUDA)."""
    return torch.cuda.device_count() if cuda_available() else 0


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when a CUDA device is visible, else `cpu`."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    return device


def current_device_index() -> int:
    """The calling thread's current device index (0 on CPU)."""
    return torch.cuda.current_device() if cuda_available() else 0


def set_device(index: int) -> None:
    """Bind the calling thread to a device. CUDA's current device is thread-local (vLLM #39548)."""
    if cuda_available():
        torch.cuda.set_device(index)
    _thread_device.index = index


def bound_device_index() -> int | None:
    """The index `set_device` last bound in this thread (also on CPU, for tests), or None."""
    return getattr(_thread_device, "index", None)


def device_memory_bytes(index: int = 0) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device. This creates a CUDA context on it (about 500 MiB that the
    process holds until it exits): the launcher uses `device_total_bytes` instead."""
    free, total = torch.cuda.mem_get_info(index)
    return int(free), int(total)


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to CUDA from pinned memory without a stream sync (torch's blocking
    host-to-device copy synchronizes the stream, which would stall a step)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def device_total_bytes(index: int = 0) -> int:
    """Total bytes of a CUDA device, read without creating a CUDA context on it."""
    return int(torch.cuda.get_device_properties(index).total_memory)


@lru_cache(maxsize=1)
def is_cumem_allocator_available() -> bool:
    """True when the CuMem (cuMemCreate/cuMemMap) allocator can run here: CUDA and the driver API."""
    if not cuda_available() or torch.version.cuda is None:
        return False
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def is_sleep_mode_available() -> bool:
    """Sleep mode backs weights up and discards KV through the CuMem pools, so it needs the same support."""
    return is_cumem_allocator_available()


def expandable_segments_enabled() -> bool:
    """True when PYTORCH_CUDA_ALLOC_CONF turns on expandable_segments (it breaks RDMA registration, vLLM #33540)."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    return any(part.strip().replace(" ", "") == "expandable_segments:True" for part in conf.split(","))


# torch.cuda.Stream's and Event's constructors and Event.query carry no annotations; typed here once.
def cuda_stream(device: torch.device | int) -> torch.cuda.Stream:
    """A new CUDA stream on `device`."""
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]  # torch: unannotated __new__


def cuda_event(timing: bool = False) -> torch.cuda.Event:
    """A new CUDA event; `timing` lets elapsed_time() measure between two of them."""
    return torch.cuda.Event(enable_timing=timing)  # type: ignore[no-untyped-call]  # torch: unannotated __new__


def event_done(event: torch.cuda.Event) -> bool:
    """Whether the work before the event's record has completed (never blocks)."""
    return bool(event.query())  # type: ignore[no-untyped-call]  # torch: unannotated query()


import threading  # noqa: E402  (kept at the end: only the thread-local below needs it)

_thread_device = threading.local()
