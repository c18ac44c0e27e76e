"""The CuMem allocator: torch MemPools whose segments are cuMemCreate'd physical memory mapped into a
cuMemAddressReserve'd virtual range, so `sleep` can release the physical memory and `wake_up` map new
memory at the same virtual addresses (tensors, CUDA graphs and registrations keep their pointers).

Pure Python: torch's pluggable-allocator hook takes two C function pointers, which are ctypes
callbacks here; the driver calls go through `cuda.bindings.driver`. Nothing is imported from CUDA
until an allocator is created, so this module imports on CPU-only hosts.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.memory.platform import cuda_stream, is_cumem_allocator_available

logger = logging.getLogger(__name__)

# void* alloc(size_t size, int device, cudaStream_t stream); void free(void* ptr, size_t size, int device, cudaStream_t)
_ALLOC_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
_FREE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)

FIELD = "enable_cumem_allocator"


class CuMemError(PdlaunchError):
    """The CuMem allocator cannot do what was asked (platform, driver call, second instance, asleep pool)."""


@dataclass
class _Allocation:
    ptr: int  # start of the virtual range; torch's segment pointer
    size: int  # bytes, a multiple of the allocation granularity
    device: int
    tag: str
    handle: Any = None  # CUmemGenericAllocationHandle while physical memory is mapped, None while asleep
    backup: torch.Tensor | None = None  # pinned uint8 [size] while asleep with the tag offloaded


@dataclass
class _DeviceProps:
    prop: Any  # CUmemAllocationProp
    access: Any  # CUmemAccessDesc: read/write from this device
    granularity: int  # bytes
    rdma_capable: bool


def _round_up(size: int, granularity: int) -> int:
    return (size + granularity - 1) // granularity * granularity


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


class CuMemAllocator:
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
        try:
            from cuda.bindings import driver
        except ImportError as exc:
            raise CuMemError("the cumem allocator needs the cuda-bindings package", field=FIELD,
                             hint="pip install cuda-bindings (same major version as your CUDA)") from exc
        self._cu = driver
        self._check(driver.cuInit(0), "cuInit")
        self._lock = threading.RLock()
        self._allocations: dict[int, _Allocation] = {}
        self._devices: dict[int, _DeviceProps] = {}
        self._pools: dict[tuple[str, int], torch.cuda.MemPool] = {}
        self._copy_streams: dict[int, torch.cuda.Stream] = {}
        self._thread = threading.local()  # .tags: the use_memory_pool stack of this thread
        # The callbacks must outlive every segment torch holds: kept on the instance, which lives forever.
        self._c_alloc = _ALLOC_FN(self._alloc_callback)
        self._c_free = _FREE_FN(self._free_callback)
        alloc_address = ctypes.cast(self._c_alloc, ctypes.c_void_p).value
        free_address = ctypes.cast(self._c_free, ctypes.c_void_p).value
        assert alloc_address is not None and free_address is not None, "a live ctypes callback has an address"
        self._torch_allocator = torch._C._cuda_customAllocator(alloc_address, free_address)
        atexit.register(self._keep_pools_at_exit)
        type(self)._instance = self

    # -- driver helpers ---------------------------------------------------------------------------
    def _check(self, result: tuple[Any, ...], what: str) -> Any:
        err, *values = result
        if err != self._cu.CUresult.CUDA_SUCCESS:
            name = self._cu.cuGetErrorName(err)[1]
            text = name.decode() if isinstance(name, bytes) else str(err)
            hint = ("free GPU memory held by other processes, then retry"
                    if "OUT_OF_MEMORY" in text else None)
            raise CuMemError(f"{what} failed: {text}", field=FIELD, hint=hint)
        return values[0] if len(values) == 1 else None

    def _device_props(self, device: int) -> _DeviceProps:
        props = self._devices.get(device)
        if props is not None:
            return props
        cu = self._cu
        dev = self._check(cu.cuDeviceGet(device), f"cuDeviceGet({device})")
        rdma = bool(self._check(cu.cuDeviceGetAttribute(
            cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED, dev),
            "cuDeviceGetAttribute(GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED)"))
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        if rdma:  # cross-node NIXL/UCX can register this memory with the NIC (GPUDirect RDMA)
            prop.allocFlags.gpuDirectRDMACapable = 1
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        granularity = int(self._check(cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity"))
        props = self._devices[device] = _DeviceProps(prop, access, granularity, rdma)
        logger.info("cumem: device %d granularity %d bytes, gpuDirectRDMA %s", device, granularity, rdma)
        return props

    def _map(self, ptr: int, size: int, device: int) -> Any:
        """Create physical memory and map it read/write at [ptr, ptr + size); returns its handle."""
        cu, props = self._cu, self._device_props(device)
        handle = self._check(cu.cuMemCreate(size, props.prop, 0), f"cuMemCreate({size} bytes)")
        try:
            self._check(cu.cuMemMap(ptr, size, 0, handle, 0), "cuMemMap")
        except CuMemError:
            cu.cuMemRelease(handle)
            raise
        try:
            self._check(cu.cuMemSetAccess(ptr, size, [props.access], 1), "cuMemSetAccess")
        except CuMemError:
            cu.cuMemUnmap(ptr, size)
            cu.cuMemRelease(handle)
            raise
        return handle

    def _unmap(self, alloc: _Allocation) -> None:
        self._check(self._cu.cuMemUnmap(alloc.ptr, alloc.size), "cuMemUnmap")
        self._check(self._cu.cuMemRelease(alloc.handle), "cuMemRelease")
        alloc.handle = None

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
                self._allocations[ptr] = _Allocation(ptr, size, device, tag, handle)
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

    def sleep(self, offload_tags: Sequence[str] = ("weights",)) -> int:
        """Release the physical memory of every allocation, first copying `offload_tags` to pinned CPU
        memory. Virtual ranges stay reserved. Already released allocations are left alone (safe to
        repeat). Returns the bytes released."""
        offload = set(offload_tags)
        with self._lock:
            awake = [a for a in self._allocations.values() if a.handle is not None]
            for device in sorted({a.device for a in awake}):
                torch.cuda.synchronize(device)  # no kernel may still touch memory that is about to go
            try:
                for alloc in awake:
                    if alloc.tag in offload:
                        alloc.backup = torch.empty(alloc.size, dtype=torch.uint8, pin_memory=True)
                        self._check(self._cu.cuMemcpyDtoHAsync(alloc.backup.data_ptr(), alloc.ptr, alloc.size,
                                                               self._copy_stream(alloc.device).cuda_stream),
                                    "cuMemcpyDtoHAsync (backup)")
                self._sync_copies({a.device for a in awake})
            except BaseException:  # nothing was released: stay fully awake, drop partial backups
                for alloc in awake:
                    alloc.backup = None
                raise
            for alloc in awake:
                self._unmap(alloc)
            freed = sum(a.size for a in awake)
        logger.info("cumem: slept, released %.2f GiB (%s backed up)", freed / 2**30, sorted(offload) or "nothing")
        return freed

    def wake_up(self, tags: Sequence[str] | None = None) -> int:
        """Map physical memory again for the released allocations of `tags` (all when None) at their old
        addresses, restoring backed-up contents; others come back uninitialised. Awake ones are left
        alone (safe to repeat); after a failure (e.g. out of memory) a retry resumes: an allocation whose
        restore failed is asleep again with its backup kept. Returns bytes mapped."""
        with self._lock:
            asleep = [a for a in self._allocations.values()
                      if a.handle is None and (tags is None or a.tag in tags)]
            woken: list[_Allocation] = []
            try:
                for alloc in asleep:
                    self._wake(alloc)
                    woken.append(alloc)
            finally:
                self._finish_restores(woken)
            mapped = sum(a.size for a in woken)
        logger.info("cumem: woke %s, mapped %.2f GiB", sorted(tags) if tags else "all", mapped / 2**30)
        return mapped

    def _wake(self, alloc: _Allocation) -> None:
        """Map `alloc` and queue the copy of its backup (if any) on the copy stream."""
        alloc.handle = self._map(alloc.ptr, alloc.size, alloc.device)
        if alloc.backup is None:
            return
        try:
            self._check(self._cu.cuMemcpyHtoDAsync(alloc.ptr, alloc.backup.data_ptr(), alloc.size,
                                                   self._copy_stream(alloc.device).cuda_stream),
                        "cuMemcpyHtoDAsync (restore)")
        except CuMemError as exc:
            self._back_to_sleep(alloc)
            raise self._restore_failed([alloc], exc) from exc

    def _finish_restores(self, woken: list[_Allocation]) -> None:
        """Wait for the restore copies of `woken`; a backup is dropped only once its copy landed."""
        restoring = [a for a in woken if a.backup is not None]
        try:
            self._sync_copies({a.device for a in woken})
        except Exception as exc:  # the copies' outcome is unknown: restore them all again on the next wake_up
            if not restoring:
                raise
            for alloc in restoring:
                self._back_to_sleep(alloc)
            raise self._restore_failed(restoring, exc) from exc
        for alloc in restoring:
            alloc.backup = None

    def _back_to_sleep(self, alloc: _Allocation) -> None:
        """Unmap `alloc` whose restore did not land, keeping its backup: it is asleep again."""
        try:
            self._unmap(alloc)
        except CuMemError:
            logger.exception("cumem: %d bytes of pool %r at %#x whose restore failed stay mapped, without their "
                             "contents", alloc.size, alloc.tag, alloc.ptr)

    @staticmethod
    def _restore_failed(allocs: list[_Allocation], exc: Exception) -> CuMemError:
        tags = sorted({a.tag for a in allocs})
        why = exc.message if isinstance(exc, CuMemError) else f"{type(exc).__name__}: {exc}"
        return CuMemError(f"restoring {sum(a.size for a in allocs)} bytes of memory pool(s) {tags} from their host "
                          f"backup failed: {why}", field=FIELD,
                          hint="the backup is kept and the pool stays asleep: call wake_up again; if the CUDA "
                               "error persists, restart the instance")

    def _copy_stream(self, device: int) -> torch.cuda.Stream:
        if device not in self._copy_streams:
            self._copy_streams[device] = cuda_stream(device)
        return self._copy_streams[device]

    def _sync_copies(self, devices: set[int]) -> None:
        for device in devices:
            self._copy_stream(device).synchronize()

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
