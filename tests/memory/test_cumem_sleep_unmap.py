"""CuMemAllocator.sleep whose unmapping fails partway (cuMemUnmap or cuMemRelease of the k-th allocation reports an
error): the allocations still mapped keep their contents on the GPU, so their pinned host backups are dropped at
once (they used to stay pinned, GiBs of them, until the next sleep); one unmapped before the failure is asleep with
its backup and the next wake restores it. Runs on CPU: a fake driver stands in for CUDA."""

from __future__ import annotations

import ctypes
import threading

import pytest
import torch

from pdlaunch.memory.cumem import CuMemAllocator
from pdlaunch.memory.cumem_driver import Allocation, CuMemError, DeviceProps
from tests.memory.test_cumem_wake_restore import _Driver, _Stream

SIZE = 4096
PTRS = [0x7F0000000000 + i * SIZE for i in range(3)]


class _SleepDriver(_Driver):
    """Adds the backup copy, and fails the unmap (or the release) of one address."""

    def __init__(self, fail_unmap_at: int | None = None, fail_release_at: int | None = None) -> None:
        super().__init__()
        self.fail_unmap_at, self.fail_release_at = fail_unmap_at, fail_release_at
        self.handle_of: dict[int, int] = {}

    def cuMemcpyDtoHAsync(self, dst: int, src: int, size: int, stream: int) -> tuple[int]:
        ctypes.memmove(dst, self.device[src], size)
        return (0,)

    def cuMemUnmap(self, ptr: int, size: int) -> tuple[int]:
        if ptr == self.fail_unmap_at:
            return (700,)
        return super().cuMemUnmap(ptr, size)

    def cuMemRelease(self, handle: int) -> tuple[int]:
        if handle == self.fail_release_at:
            return (700,)
        return super().cuMemRelease(handle)


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """sleep's synchronize and pinned backups, on a machine without CUDA."""
    empty = torch.empty
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **kw: empty(*a, **kw))


def _awake_allocator(driver: _SleepDriver) -> tuple[CuMemAllocator, list[Allocation]]:
    """Three mapped "weights" allocations whose device bytes are distinct."""
    allocator = object.__new__(CuMemAllocator)
    allocs = []
    for i, ptr in enumerate(PTRS):
        driver.handles += 1
        driver.device[ptr] = bytes([i + 1]) * SIZE
        allocs.append(Allocation(ptr, SIZE, device=0, tag="weights", handle=driver.handles))
    allocator._cu = driver
    allocator._lock = threading.RLock()
    allocator._allocations = {a.ptr: a for a in allocs}
    allocator._devices = {0: DeviceProps(prop=None, access=None, granularity=SIZE, rdma_capable=False)}
    allocator._copy_streams = {0: _Stream()}  # type: ignore[dict-item]
    return allocator, allocs


def test_an_unmap_that_fails_partway_drops_the_backups_of_what_stays_mapped() -> None:
    driver = _SleepDriver(fail_unmap_at=PTRS[1])
    allocator, (first, second, third) = _awake_allocator(driver)
    with pytest.raises(CuMemError, match="cuMemUnmap"):
        allocator.sleep(["weights"])
    assert first.handle is None and first.backup is not None  # asleep: its backup is all it has
    assert second.handle is not None and third.handle is not None
    assert second.backup is None and third.backup is None  # still mapped, contents on the GPU: nothing pinned
    assert allocator.wake_up() == SIZE
    assert first.handle is not None and first.backup is None and driver.device[PTRS[0]] == bytes([1]) * SIZE


def test_a_release_that_fails_leaves_its_allocation_asleep_with_its_backup() -> None:
    driver = _SleepDriver(fail_release_at=2)  # the second allocation's handle: unmapped, its release refused
    allocator, (first, second, third) = _awake_allocator(driver)
    with pytest.raises(CuMemError, match="cuMemRelease"):
        allocator.sleep(["weights"])
    assert second.handle is None and second.backup is not None  # unmapped: asleep, restored by the next wake
    assert third.handle is not None and third.backup is None
    assert allocator.wake_up() == 2 * SIZE
    assert driver.device[PTRS[1]] == bytes([2]) * SIZE and driver.device[PTRS[0]] == bytes([1]) * SIZE
