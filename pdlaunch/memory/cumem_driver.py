"""The CuMem allocator's base (memory/cumem.py): its error, its allocations, and its CUDA driver calls
through `cuda.bindings.driver` (check a result, a device's allocation properties, map and unmap physical
memory at a reserved virtual range).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from pdlaunch.errors import PdlaunchError

logger = logging.getLogger("pdlaunch.memory.cumem")  # the allocator's one logger name, across its files

FIELD = "enable_cumem_allocator"


class CuMemError(PdlaunchError):
    """The CuMem allocator cannot do what was asked (platform, driver call, second instance, asleep pool)."""


@dataclass
class Allocation:
    ptr: int  # start of the virtual range; torch's segment pointer
    size: int  # bytes, a multiple of the allocation granularity
    device: int
    tag: str
    handle: Any = None  # CUmemGenericAllocationHandle while physical memory is mapped, None while asleep
    backup: torch.Tensor | None = None  # pinned uint8 [size] while asleep with the tag offloaded


@dataclass
class DeviceProps:
    prop: Any  # CUmemAllocationProp
    access: Any  # CUmemAccessDesc: read/write from this device
    granularity: int  # bytes
    rdma_capable: bool


class CuMemDriver:
    """The driver calls of `CuMemAllocator` (its base)."""

    def _open_driver(self) -> None:
        try:
            from cuda.bindings import driver
        except ImportError as exc:
            raise CuMemError("the cumem allocator needs the cuda-bindings package", field=FIELD,
                             hint="pip install cuda-bindings (same major version as your CUDA)") from exc
        self._cu = driver
        self._check(driver.cuInit(0), "cuInit")
        self._devices: dict[int, DeviceProps] = {}

    def _check(self, result: tuple[Any, ...], what: str) -> Any:
        err, *values = result
        if err != self._cu.CUresult.CUDA_SUCCESS:
            name = self._cu.cuGetErrorName(err)[1]
            text = name.decode() if isinstance(name, bytes) else str(err)
            hint = ("free GPU memory held by other processes, then retry"
                    if "OUT_OF_MEMORY" in text else None)
            raise CuMemError(f"{what} failed: {text}", field=FIELD, hint=hint)
        return values[0] if len(values) == 1 else None

    def _device_props(self, device: int) -> DeviceProps:
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
        props = self._devices[device] = DeviceProps(prop, access, granularity, rdma)
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

    def _unmap(self, alloc: Allocation) -> None:
        self._check(self._cu.cuMemUnmap(alloc.ptr, alloc.size), "cuMemUnmap")
        # unmapped: asleep from here on (a wake maps it again, from its backup), even if the release below fails
        handle, alloc.handle = alloc.handle, None
        self._check(self._cu.cuMemRelease(handle), "cuMemRelease")
