"""torch's side of the CuMem allocator (memory/cumem.py): the pluggable allocator's two C function pointers
are ctypes callbacks that reserve a virtual range and map physical memory into it per segment, tagged with
the pool the allocating thread is in (`use_memory_pool`), and unmap and free it again.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import threading

import torch

from pdlaunch.memory.cumem_driver import Allocation, CuMemDriver, CuMemError

logger = logging.getLogger("pdlaunch.memory.cumem")  # the allocator's one logger name, across its files

# void* alloc(size_t size, int device, cudaStream_t stream); void free(void* ptr, size_t size, int device, cudaStream_t)
_ALLOC_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
_FREE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)


def _round_up(size: int, granularity: int) -> int:
    return (size + granularity - 1) // granularity * granularity


class CuMemHooks(CuMemDriver):
    """torch's allocator hooks of `CuMemAllocator` (its base)."""

    # The allocator's parts these methods read; CuMemAllocator.__init__ builds them.
    _lock: threading.RLock
    _thread: threading.local  # .tags: the use_memory_pool stack of this thread
    _allocations: dict[int, Allocation]
    _pools: dict[tuple[str, int], torch.cuda.MemPool]

    def _hook_into_torch(self) -> None:
        # The callbacks must outlive every segment torch holds: kept on the instance, which lives forever.
        self._c_alloc = _ALLOC_FN(self._alloc_callback)
        self._c_free = _FREE_FN(self._free_callback)
        alloc_address = ctypes.cast(self._c_alloc, ctypes.c_void_p).value
        free_address = ctypes.cast(self._c_free, ctypes.c_void_p).value
        assert alloc_address is not None and free_address is not None, "a live ctypes callback has an address"
        self._torch_allocator = torch._C._cuda_customAllocator(alloc_address, free_address)
        atexit.register(self._keep_pools_at_exit)

    # -- torch's allocator hooks (called with torch's allocator lock held; never raise) ----------
    def _alloc_callback(self, size: int, device: int, stream: int) -> int:
        try:
            tags = getattr(self._thread, "tags", None)
            tag = tags[-1] if tags else "untagged"
            with self._lock:
                granularity = self._device_props(device).granularity
                size = _round_up(size, granularity)
                ptr = int(self._check(self._cu.cuMemAddressReserve(size, granularity, 0, 0), "cuMemAddressReserve"))
                try:
                    handle = self._map(ptr, size, device)
                except CuMemError:
                    self._cu.cuMemAddressFree(ptr, size)
                    raise
                self._allocations[ptr] = Allocation(ptr, size, device, tag, handle)
            return ptr
        except CuMemError as exc:  # torch turns a null pointer into its out-of-memory path
            logger.warning("cumem: allocation of %d bytes on device %d failed: %s", size, device, exc)
            return 0
        except Exception:
            logger.exception("cumem: allocation of %d bytes on device %d failed", size, device)
            return 0

    def _free_callback(self, ptr: int | None, size: int, device: int, stream: int) -> None:
        try:
            with self._lock:
                alloc = self._allocations.pop(ptr or 0, None)
                if alloc is None:
                    logger.error("cumem: free of unknown pointer %#x (%d bytes)", ptr or 0, size)
                    return
                if alloc.handle is not None:
                    self._unmap(alloc)
                alloc.backup = None
                self._check(self._cu.cuMemAddressFree(alloc.ptr, alloc.size), "cuMemAddressFree")
        except Exception:
            logger.exception("cumem: free of %#x failed", ptr or 0)

    def _keep_pools_at_exit(self) -> None:
        # Interpreter teardown would destroy the MemPools and run Python callbacks half torn down;
        # the process is ending, so the driver reclaims the memory instead.
        for pool in self._pools.values():
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(pool))
