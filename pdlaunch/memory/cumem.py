"""The CuMem allocator: torch MemPools whose segments are cuMemCreate'd physical memory mapped into a
cuMemAddressReserve'd virtual range, so `sleep` can release the physical memory and `wake_up` map new
memory at the same virtual addresses (tensors, CUDA graphs and registrations keep their pointers).

Pure Python: torch's pluggable-allocator hook takes two C function pointers, which are ctypes
callbacks here (cumem_hooks.py); the driver calls go through `cuda.bindings.driver` (cumem_driver.py);
sleep and wake are cumem_sleep.py's. Nothing is imported from CUDA until an allocator is created, so
this module imports on CPU-only hosts.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import ClassVar

import torch

from pdlaunch.memory.cumem_driver import FIELD, CuMemError
from pdlaunch.memory.cumem_hooks import CuMemHooks
from pdlaunch.memory.cumem_sleep import CuMemSleep
from pdlaunch.memory.platform import is_cumem_allocator_available


def _expandable_segments_on() -> bool:
    # The getter returns the last settings string torch parsed (the env at start-up, or the last set).
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    texts = [str(getter())] if getter is not None else []
    texts += [os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), os.environ.get("PYTORCH_ALLOC_CONF", "")]
    for text in texts:
        for part in text.split(","):
            key, _, value = part.replace(" ", "").partition(":")
            if key == "expandable_segments":
                return value == "True"
    return False


def _set_expandable_segments(on: bool) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        setter = torch.cuda.memory._set_allocator_settings
    setter(f"expandable_segments:{on}")


class CuMemAllocator(CuMemHooks, CuMemSleep):
    """One per process (`get_instance()`). Allocations made inside `use_memory_pool(tag)` come from
    CuMem; `sleep` releases all of their physical memory, `wake_up` brings it back at the same addresses."""

    _instance: ClassVar[CuMemAllocator | None] = None

    @classmethod
    def get_instance(cls) -> CuMemAllocator:
        return cls._instance if cls._instance is not None else cls()

    def __init__(self) -> None:
        if type(self)._instance is not None:
            raise CuMemError("a CuMem allocator already exists in this process", field=FIELD,
                             hint="use CuMemAllocator.get_instance(); one instance serves the whole process")
        if not is_cumem_allocator_available():
            raise CuMemError("cumem allocator is not supported on current platform", field=FIELD,
                             hint="it needs a CUDA GPU and its driver; drop --enable-cumem-allocator "
                                  "and --enable-sleep-mode on this host")
        self._open_driver()
        self._lock = threading.RLock()
        self._allocations = {}
        self._pools = {}
        self._copy_streams = {}
        self._thread = threading.local()
        self._hook_into_torch()
        type(self)._instance = self

    # -- public API ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def use_memory_pool(self, tag: str = "weights") -> Iterator[None]:
        """Route this thread's CUDA allocations to the CuMem pool of `tag` (expandable segments off inside)."""
        if tag in self.asleep_tags():
            raise CuMemError(f"memory pool {tag!r} is asleep; allocating in it now would hand out unmapped memory",
                             field=FIELD, hint=f"wake_up(tags=[{tag!r}]) first")
        device = torch.cuda.current_device()
        with self._lock:
            pool = self._pools.get((tag, device))
            if pool is None:
                pool = self._pools[(tag, device)] = torch.cuda.MemPool(allocator=self._torch_allocator)
        expandable = _expandable_segments_on()
        if expandable:  # torch would map its own segments into the pool instead of calling ours
            _set_expandable_segments(False)
        tags = self._thread.__dict__.setdefault("tags", [])
        tags.append(tag)
        try:
            with torch.cuda.use_mem_pool(pool, device):
                yield
        finally:
            tags.pop()
            if expandable:
                _set_expandable_segments(True)

    def release_pool(self, tag: str) -> None:
        """Drop the pools of `tag`: segments with no live tensor go back to the driver (also while asleep).
        Free every tensor of the pool first; segments still in use are released once they are freed."""
        with self._lock:
            pools = [key for key in self._pools if key[0] == tag]
            dropped = [self._pools.pop(key) for key in pools]
        del dropped  # MemPool's destructor empties its cache, which calls _free_callback per segment
        torch.cuda.empty_cache()

    def asleep_tags(self) -> set[str]:
        with self._lock:
            return {a.tag for a in self._allocations.values() if a.handle is None}

    def get_current_usage(self) -> int:
        """Bytes of virtual memory the pools hold, awake or asleep."""
        with self._lock:
            return sum(a.size for a in self._allocations.values())

    def usage_by_tag(self, mapped_only: bool = False) -> dict[str, int]:
        """Bytes per tag; with `mapped_only`, only those backed by physical memory now."""
        usage: dict[str, int] = {}
        with self._lock:
            for a in self._allocations.values():
                if a.handle is not None or not mapped_only:
                    usage[a.tag] = usage.get(a.tag, 0) + a.size
        return usage

    def rdma_capable(self, device: int | None = None) -> bool:
        """Whether this device's CuMem allocations are GPUDirect-RDMA capable (cross-node NIXL)."""
        return self._device_props(torch.cuda.current_device() if device is None else device).rdma_capable

    def granularity(self, device: int | None = None) -> int:
        """Bytes every allocation is rounded up to on this device."""
        return self._device_props(torch.cuda.current_device() if device is None else device).granularity


def memory_pool_context(enabled: bool, tag: str) -> contextlib.AbstractContextManager[None]:
    """The worker's way in (vLLM #33540): a no-op unless the cumem allocator is enabled. Loading weights
    into an allocator that already holds memory means a second instance in this process: refused."""
    if not enabled:
        return contextlib.nullcontext()
    allocator = CuMemAllocator.get_instance()
    if tag == "weights" and allocator.get_current_usage() != 0:
        raise CuMemError("the CuMem allocator serves one instance per process and already holds "
                         f"{allocator.get_current_usage() / 2**30:.2f} GiB", field=FIELD,
                         hint="run each instance in its own process")
    return allocator.use_memory_pool(tag)
