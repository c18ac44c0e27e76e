"""The platform layer: which device, bind it, how much memory. Nothing else hard-codes a device.
What a launcher asks before anything runs lives in host_devices.py (no torch import), re-exported here."""

from __future__ import annotations

import torch

from pdlaunch.memory.host_devices import cuda_available as cuda_available
from pdlaunch.memory.host_devices import device_count as device_count
from pdlaunch.memory.host_devices import device_total_bytes as device_total_bytes
from pdlaunch.memory.host_devices import expandable_segments_enabled as expandable_segments_enabled
from pdlaunch.memory.host_devices import is_cumem_allocator_available as is_cumem_allocator_available
from pdlaunch.memory.host_devices import is_sleep_mode_available as is_sleep_mode_available
from pdlaunch.memory.host_devices import resolve_device as resolve_device


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
