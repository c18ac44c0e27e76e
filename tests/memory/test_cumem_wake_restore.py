"""CuMemAllocator.wake_up whose restore of a backed-up pool fails (the host-to-device copy cannot be queued, or
the copy stream reports an error): the allocation is unmapped again with its backup kept, the pool stays asleep
and a clear error names it, so a later wake_up restores the weights. Its backup used to be dropped with the
allocation left mapped: the weights were lost for good. Runs on CPU: a fake driver stands in for CUDA."""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import pytest
import torch

from pdlaunch.memory.cumem import CuMemAllocator
from pdlaunch.memory.cumem_driver import Allocation, CuMemError, DeviceProps

SIZE = 4096  # bytes of the one allocation, a multiple of the fake granularity
PTR = 0x7F0000000000  # its virtual address


class _Driver:
    """The driver calls wake_up makes; device memory is a dict of the bytes each restore copied."""

    class CUresult:
        CUDA_SUCCESS = 0

    def __init__(self) -> None:
        self.handles = 0  # physical allocations created and not released
        self.device: dict[int, bytes] = {}  # virtual address -> contents copied there
        self.copy_errors = 0  # fail this many cuMemcpyHtoDAsync calls

    def cuGetErrorName(self, err: int) -> tuple[int, bytes]:
        return 0, b"CUDA_ERROR_ILLEGAL_ADDRESS"

    def cuMemCreate(self, size: int, prop: Any, flags: int) -> tuple[int, int]:
        self.handles += 1
        return 0, self.handles

    def cuMemMap(self, ptr: int, size: int, offset: int, handle: int, flags: int) -> tuple[int]:
        return (0,)

    def cuMemSetAccess(self, ptr: int, size: int, access: list[Any], count: int) -> tuple[int]:
        return (0,)

    def cuMemUnmap(self, ptr: int, size: int) -> tuple[int]:
        self.device.pop(ptr, None)
        return (0,)

    def cuMemRelease(self, handle: int) -> tuple[int]:
        self.handles -= 1
        return (0,)

    def cuMemcpyHtoDAsync(self, dst: int, src: int, size: int, stream: int) -> tuple[int]:
        if self.copy_errors:
            self.copy_errors -= 1
            return (700,)
        self.device[dst] = ctypes.string_at(src, size)
        return (0,)


class _Stream:
    def __init__(self) -> None:
        self.cuda_stream = 0
        self.errors = 0  # fail this many synchronize calls

    def synchronize(self) -> None:
        if self.errors:
            self.errors -= 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _asleep_allocator() -> tuple[CuMemAllocator, _Driver, _Stream, Allocation, torch.Tensor]:
    """An allocator (no CUDA, no __init__) holding one "weights" allocation asleep with its backup."""
    allocator = object.__new__(CuMemAllocator)
    driver, stream = _Driver(), _Stream()
    backup = torch.randint(0, 256, (SIZE,), dtype=torch.uint8)
    alloc = Allocation(PTR, SIZE, device=0, tag="weights", backup=backup)
    allocator._cu = driver
    allocator._lock = threading.RLock()
    allocator._allocations = {PTR: alloc}
    allocator._devices = {0: DeviceProps(prop=None, access=None, granularity=SIZE, rdma_capable=False)}
    allocator._copy_streams = {0: stream}  # type: ignore[dict-item]
    return allocator, driver, stream, alloc, backup.clone()


def _assert_asleep_with_backup(allocator: CuMemAllocator, driver: _Driver, alloc: Allocation,
                               expected: torch.Tensor) -> None:
    assert allocator.asleep_tags() == {"weights"} and alloc.handle is None and driver.handles == 0
    assert alloc.backup is not None and torch.equal(alloc.backup, expected)


def _assert_restored(allocator: CuMemAllocator, driver: _Driver, alloc: Allocation, expected: torch.Tensor) -> None:
    assert allocator.asleep_tags() == set() and alloc.handle is not None and alloc.backup is None
    assert driver.device[PTR] == expected.numpy().tobytes()


def test_a_restore_that_cannot_be_queued_keeps_the_backup_for_the_next_wake() -> None:
    allocator, driver, _, alloc, expected = _asleep_allocator()
    driver.copy_errors = 1
    with pytest.raises(CuMemError) as err:
        allocator.wake_up()
    _assert_asleep_with_backup(allocator, driver, alloc, expected)
    assert err.value.message == ("restoring 4096 bytes of memory pool(s) ['weights'] from their host backup failed: "
                                 "cuMemcpyHtoDAsync (restore) failed: CUDA_ERROR_ILLEGAL_ADDRESS")
    assert err.value.field == "enable_cumem_allocator" and "wake_up again" in (err.value.hint or "")
    assert allocator.wake_up() == SIZE
    _assert_restored(allocator, driver, alloc, expected)


def test_a_restore_whose_copy_stream_fails_keeps_the_backup_for_the_next_wake() -> None:
    allocator, driver, stream, alloc, expected = _asleep_allocator()
    stream.errors = 1
    with pytest.raises(CuMemError, match="illegal memory access") as err:
        allocator.wake_up(["weights"])
    assert "backup is kept" in (err.value.hint or "")
    _assert_asleep_with_backup(allocator, driver, alloc, expected)
    assert allocator.wake_up(["weights"]) == SIZE
    _assert_restored(allocator, driver, alloc, expected)
