"""The CUDA caching allocator's retries and device mallocs, counted and reported while serving."""

from __future__ import annotations

import logging

import pytest
import torch

from pdlaunch.engine import allocator_watch as watch_module
from pdlaunch.engine.allocator_watch import (
    ALLOCATOR_RETRIES,
    CACHE_FREES,
    DEVICE_MALLOCS,
    AllocatorWatch,
    allocator_watch,
)


class FakeAllocator:
    def __init__(self) -> None:
        self.stats = {"num_device_free": 2, "num_alloc_retries": 3, "num_device_alloc": 40}
        self.reads = 0
        self.now = 100.0

    def read(self) -> dict[str, int]:
        self.reads += 1
        return dict(self.stats)


def test_counts_only_what_changed_after_start_up_and_reads_at_most_once_a_second(
        caplog: pytest.LogCaptureFixture) -> None:
    alloc = FakeAllocator()
    watch = AllocatorWatch(alloc.read, now=lambda: alloc.now)
    frees0, retries0, mallocs0 = CACHE_FREES._value.get(), ALLOCATOR_RETRIES._value.get(), DEVICE_MALLOCS._value.get()
    alloc.stats = {"num_device_free": 6, "num_alloc_retries": 5, "num_device_alloc": 47}
    alloc.now += 0.5
    watch.poll()  # within POLL_EVERY_S of the last read: no read
    assert alloc.reads == 1 and ALLOCATOR_RETRIES._value.get() == retries0
    alloc.now += 0.6
    with caplog.at_level(logging.WARNING, logger=watch_module.__name__):
        watch.poll()
    assert alloc.reads == 2
    assert CACHE_FREES._value.get() - frees0 == 4  # start-up's 2 are not serving's
    assert ALLOCATOR_RETRIES._value.get() - retries0 == 2
    assert DEVICE_MALLOCS._value.get() - mallocs0 == 7
    assert "freed 4 cached block(s)" in caplog.text and "--gpu-memory-utilization" in caplog.text


def test_warnings_are_rate_limited_and_carry_the_retries_between_them(caplog: pytest.LogCaptureFixture) -> None:
    alloc = FakeAllocator()
    watch = AllocatorWatch(alloc.read, now=lambda: alloc.now)
    with caplog.at_level(logging.WARNING, logger=watch_module.__name__):
        for frees in (4, 6, 9):  # three polls a second apart, all within LOG_EVERY_S of the first warning
            alloc.stats = {"num_device_free": frees, "num_alloc_retries": 3, "num_device_alloc": 40}
            alloc.now += 1.0
            watch.poll()
        assert caplog.text.count("ran short of device memory") == 1
        alloc.now += watch_module.LOG_EVERY_S
        alloc.stats = {"num_device_free": 10, "num_alloc_retries": 3, "num_device_alloc": 40}
        watch.poll()
    assert caplog.text.count("ran short of device memory") == 2
    assert "freed 6 cached block(s)" in caplog.text  # 2 + 3 held back, and this poll's 1


def test_a_sleep_s_frees_are_not_reported() -> None:
    alloc = FakeAllocator()
    watch = AllocatorWatch(alloc.read, now=lambda: alloc.now)
    frees0 = CACHE_FREES._value.get()
    alloc.stats = {"num_device_free": 50, "num_alloc_retries": 3, "num_device_alloc": 90}
    watch.rebase()  # a sleep emptied the cache, a wake-up allocated again
    alloc.now += 2.0
    watch.poll()
    assert CACHE_FREES._value.get() == frees0


def test_a_quiet_allocator_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    alloc = FakeAllocator()
    watch = AllocatorWatch(alloc.read, now=lambda: alloc.now)
    with caplog.at_level(logging.WARNING, logger=watch_module.__name__):
        for _ in range(3):
            alloc.now += 2.0
            watch.poll()
    assert alloc.reads == 4 and "ran short" not in caplog.text


def test_no_watch_off_cuda() -> None:
    assert allocator_watch(torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.gpu_serial  # fills the GPU's free memory, which workers beside it would hold
def test_a_real_retry_on_cuda_is_counted() -> None:
    """Cached blocks that must be freed for a larger tensor: the allocator's own frees, read from the device."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda", 0)
    free, _ = torch.cuda.mem_get_info(device)
    torch.cuda.empty_cache()
    alloc_now = [0.0]
    watch = AllocatorWatch(lambda: torch.cuda.memory_stats(device), now=lambda: alloc_now[0])
    frees0 = CACHE_FREES._value.get()
    chunk = free // 4
    held = [torch.empty(chunk, dtype=torch.uint8, device=device) for _ in range(3)]
    del held  # three cached blocks: the next tensor fits only once they are freed back to the device
    big = torch.empty(chunk * 2, dtype=torch.uint8, device=device)
    del big  # (its block stays cached: nothing here empties the cache on purpose)
    alloc_now[0] += 2.0
    watch.poll()
    assert CACHE_FREES._value.get() - frees0 >= 1
