"""The CPU tier's pinned regions lock exactly --kv-offload-gb's blocks: torch's caching host allocator
(`pin_memory=True`) would round each group's region up to a power of two, up to twice the budget. The
driver calls are faked here (no CUDA on the test host); what they are asked to lock is what is checked."""

from __future__ import annotations

import pytest
import torch

from pdlaunch.errors import EngineError
from pdlaunch.offload import pinned_region
from pdlaunch.offload.cpu_tier import CPUTier

# Two KV-cache groups of different sizes (e.g. full attention and sliding window): [layers, 2, bs, heads, dim]
SHAPES = [(3, 2, 4, 1, 2), (1, 2, 4, 1, 2)]


class FakeDriver:
    def __init__(self, fail_at: int | None = None) -> None:
        self.pinned: dict[int, int] = {}  # data_ptr -> bytes locked
        self.calls = 0
        self.fail_at = fail_at

    def register(self, data_ptr: int, num_bytes: int) -> int:
        self.calls += 1
        if self.calls == self.fail_at:
            return 2  # cudaErrorMemoryAllocation
        assert data_ptr not in self.pinned
        self.pinned[data_ptr] = num_bytes
        return 0

    def unregister(self, data_ptr: int) -> int:
        return 0 if self.pinned.pop(data_ptr, None) is not None else 1


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> FakeDriver:
    fake = FakeDriver()
    monkeypatch.setattr(pinned_region, "host_register", fake.register)
    monkeypatch.setattr(pinned_region, "host_unregister", fake.unregister)
    return fake


def test_pinned_tier_locks_exactly_its_blocks(driver: FakeDriver) -> None:
    budget = 5 * 2**20  # not a power of two: the caching allocator would lock 8 MiB in all
    num_blocks = budget // CPUTier.bytes_per_block(SHAPES, torch.float32)
    tier = CPUTier(num_blocks, SHAPES, torch.float32, pin_memory=True)
    assert driver.pinned == {c.data_ptr(): c.nbytes for c in tier.caches}
    locked = sum(driver.pinned.values())
    assert locked == num_blocks * CPUTier.bytes_per_block(SHAPES, torch.float32) <= budget
    assert all(not c.any() for c in tier.caches)  # zeroed, as before
    tier.release()
    tier.release()  # idempotent
    assert driver.pinned == {}


def test_pinning_that_fails_names_the_flag_and_unpins_what_it_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDriver(fail_at=2)
    monkeypatch.setattr(pinned_region, "host_register", fake.register)
    monkeypatch.setattr(pinned_region, "host_unregister", fake.unregister)
    with pytest.raises(EngineError) as err:
        CPUTier(16, SHAPES, torch.float32, pin_memory=True)
    assert err.value.field == "cache.kv_offload_gb" and "cudaHostRegister" in err.value.message
    assert fake.pinned == {}, "the first group's region stayed pinned"


def test_unpinned_tier_calls_no_driver(driver: FakeDriver) -> None:
    tier = CPUTier(4, SHAPES, torch.float32, pin_memory=False)
    tier.release()
    assert driver.calls == 0
