"""The device (or, for a CPU instance, the host) running out of memory while the runner starts: recognized, and
said in one line."""

from __future__ import annotations

import errno

import torch

from pdlaunch.memory.platform import device_memory_bytes


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is the GPU running out of memory: torch's allocator (OutOfMemoryError) or the CUDA runtime
    itself (`CUDA error: out of memory`, cudaErrorMemoryAllocation: measured on an H100 with 1.5 GiB left, the
    first launch of a kernel whose module CUDA loads lazily failed so after its tensor had been allocated)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "CUDA error: out of memory" in str(exc))


def host_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is the host refusing memory (the kernel's overcommit limit, or a ulimit -v): torch's CPU
    allocator's `DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes`, or an anonymous
    mapping's OSError ENOMEM (the CPU KV cache's, kv_cache_tensors.zeros)."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOMEM
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def free_text(device: torch.device) -> str:
    """"; F of T GiB are free on cuda:K" after an allocation failed there (torch's cache emptied first); "" on CPU."""
    if device.type != "cuda":
        return ""
    torch.cuda.empty_cache()
    free, total = device_memory_bytes(device.index or 0)
    return f"; {free / 2**30:.2f} of {total / 2**30:.2f} GiB are free on {device}"


def first_line(exc: BaseException) -> str:
    """An error's first line (torch's out-of-memory message without its advice paragraph); its type if empty."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
