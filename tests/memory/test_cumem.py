"""CuMemAllocator on a real GPU (marked gpu), and its clear refusal on a host without CUDA."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch

from pdlaunch.memory.cumem import CuMemAllocator, _expandable_segments_on, memory_pool_context
from pdlaunch.memory.cumem_driver import CuMemError
from pdlaunch.memory.sleep import MemorySleep

MiB = 1 << 20
SLACK = 64 * MiB  # device-wide free memory also moves with the driver's own bookkeeping


# -- CPU host -----------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without CUDA")
def test_refused_clearly_without_cuda() -> None:
    with pytest.raises(CuMemError) as err:
        CuMemAllocator.get_instance()
    assert err.value.field == "enable_cumem_allocator"
    assert "not supported on current platform" in err.value.message
    assert "--enable-sleep-mode" in (err.value.hint or "")
    with pytest.raises(CuMemError):
        memory_pool_context(True, "weights")
    assert CuMemAllocator._instance is None


def test_disabled_pool_context_is_a_no_op() -> None:
    with memory_pool_context(False, "weights"):
        tensor = torch.ones(4)
    assert tensor.sum().item() == 4


# -- GPU ----------------------------------------------------------------------------------------
def _free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


@pytest.fixture
def allocator() -> Iterator[CuMemAllocator]:
    allocator = CuMemAllocator.get_instance()
    yield allocator
    allocator.wake_up()
    gc.collect()
    for tag in list(allocator.usage_by_tag()):
        allocator.release_pool(tag)
    assert allocator.get_current_usage() == 0, f"segments left behind: {allocator.usage_by_tag()}"


def _weights(allocator: CuMemAllocator, count: int, rows: int = 8192) -> list[torch.Tensor]:
    with allocator.use_memory_pool("weights"):
        return [torch.randn(rows, 8192, dtype=torch.bfloat16, device="cuda") for _ in range(count)]  # 128 MiB each


@pytest.mark.gpu
def test_sleep_releases_memory_and_wake_restores_at_same_address(allocator: CuMemAllocator) -> None:
    weights = _weights(allocator, 8)  # 1 GiB
    with allocator.use_memory_pool("kv_cache"):
        kv_cache = torch.ones(1024 * MiB, dtype=torch.uint8, device="cuda")
    copies = [w.clone() for w in weights]  # outside the pool
    pointers = [w.data_ptr() for w in weights] + [kv_cache.data_ptr()]
    x = torch.randn(64, 8192, dtype=torch.bfloat16, device="cuda")
    expected = x @ weights[0]
    pool_bytes = sum(allocator.usage_by_tag(mapped_only=True).values())
    assert pool_bytes >= 2048 * MiB

    awake = _free_bytes()
    freed = allocator.sleep(offload_tags=("weights",))
    asleep = _free_bytes()
    assert freed == pool_bytes
    assert asleep - awake >= 0.95 * pool_bytes, f"released {(asleep - awake) / MiB:.0f} of {pool_bytes / MiB:.0f} MiB"
    assert allocator.asleep_tags() == {"weights", "kv_cache"}
    assert allocator.usage_by_tag(mapped_only=True) == {}
    assert allocator.get_current_usage() == pool_bytes  # the virtual ranges stay reserved

    assert allocator.wake_up() == pool_bytes
    # Wake takes back what sleep gave; the first sleep's copy stream and pinned buffers may cost a
    # few driver MiB once (test_twenty_cycles_do_not_grow checks that nothing grows after that).
    assert abs((asleep - _free_bytes()) - pool_bytes) <= SLACK
    assert [w.data_ptr() for w in weights] + [kv_cache.data_ptr()] == pointers
    assert all(torch.equal(w, c) for w, c in zip(weights, copies))
    torch.testing.assert_close(x @ weights[0], expected)
    kv_cache.fill_(7)  # discarded contents, but the memory is usable again
    assert int(kv_cache[::MiB].sum()) == 7 * 1024


@pytest.mark.gpu
def test_allocations_are_rounded_to_granularity(allocator: CuMemAllocator) -> None:
    with allocator.use_memory_pool("weights"):
        small = torch.zeros(256, device="cuda")  # 1 KiB
        odd = torch.zeros(3 * MiB + 5, dtype=torch.uint8, device="cuda")
    granularity = allocator.granularity()
    assert granularity > 0 and allocator.get_current_usage() % granularity == 0
    assert allocator.get_current_usage() >= small.nbytes + odd.nbytes
    print(f"granularity {granularity} bytes, GPUDirect RDMA capable: {allocator.rdma_capable()}")


@pytest.mark.gpu
def test_twenty_cycles_do_not_grow(allocator: CuMemAllocator) -> None:
    weights = _weights(allocator, 4)
    with allocator.use_memory_pool("kv_cache"):
        kv_cache = torch.zeros(512 * MiB, dtype=torch.uint8, device="cuda")
    copies = [w.clone() for w in weights]
    controller = MemorySleep(allocator)
    awake_free, asleep_free = [], []
    for _ in range(20):
        controller.sleep(level=1)
        asleep_free.append(_free_bytes())
        controller.wake_up()
        awake_free.append(_free_bytes())
    assert max(awake_free) - min(awake_free) <= SLACK, [f / MiB for f in awake_free]
    assert max(asleep_free) - min(asleep_free) <= SLACK, [f / MiB for f in asleep_free]
    assert all(torch.equal(w, c) for w, c in zip(weights, copies))
    assert allocator.get_current_usage() == sum(allocator.usage_by_tag(mapped_only=True).values())
    del kv_cache


@pytest.mark.gpu
def test_double_sleep_and_double_wake_are_safe(allocator: CuMemAllocator) -> None:
    weights = _weights(allocator, 2)
    copies = [w.clone() for w in weights]
    assert allocator.sleep(("weights",)) > 0
    assert allocator.sleep(("weights",)) == 0  # must not back up unmapped memory over the real copy
    assert allocator.wake_up(["weights"]) > 0
    assert allocator.wake_up(["weights"]) == 0
    assert all(torch.equal(w, c) for w, c in zip(weights, copies))


@pytest.mark.gpu
def test_partial_wake_and_allocation_into_asleep_pool_refused(allocator: CuMemAllocator) -> None:
    weights = _weights(allocator, 1)
    with allocator.use_memory_pool("kv_cache"):
        kv_cache = torch.zeros(64 * MiB, dtype=torch.uint8, device="cuda")
    allocator.sleep(("weights",))
    allocator.wake_up(["weights"])
    assert allocator.asleep_tags() == {"kv_cache"}
    with pytest.raises(CuMemError, match="asleep") as err:
        with allocator.use_memory_pool("kv_cache"):
            pass
    assert "wake_up" in (err.value.hint or "")
    assert weights[0].float().abs().sum().item() > 0
    allocator.wake_up(["kv_cache"])
    del kv_cache


@pytest.mark.gpu
def test_free_while_asleep(allocator: CuMemAllocator) -> None:
    weights = _weights(allocator, 1)
    copy = weights[0].clone()
    with allocator.use_memory_pool("scratch"):
        scratch = torch.ones(256 * MiB, dtype=torch.uint8, device="cuda")
    del scratch
    allocator.sleep(("weights",))
    allocator.release_pool("scratch")  # the driver gets the reservation back while it is unmapped
    assert "scratch" not in allocator.usage_by_tag()
    allocator.wake_up()
    assert torch.equal(weights[0], copy)


@pytest.mark.gpu
def test_cuda_graph_replays_after_wake(allocator: CuMemAllocator) -> None:
    weight = _weights(allocator, 1, rows=1024)[0]  # [1024, 8192]
    static_x = torch.randn(16, 1024, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        static_x @ weight  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = static_x @ weight
    expected = (static_x @ weight).clone()
    allocator.sleep(("weights",))
    allocator.wake_up()
    static_y.zero_()
    graph.replay()
    torch.testing.assert_close(static_y, expected)
    del graph, static_y


@pytest.mark.gpu
def test_second_instance_is_refused(allocator: CuMemAllocator) -> None:
    with pytest.raises(CuMemError, match="already exists"):
        CuMemAllocator()
    with memory_pool_context(True, "weights"):
        weights = torch.zeros(MiB, device="cuda")
    with pytest.raises(CuMemError, match="one instance per process") as err:
        memory_pool_context(True, "weights")
    assert err.value.field == "enable_cumem_allocator"
    with memory_pool_context(True, "kv_cache"):  # the same instance's KV cache is fine
        kv_cache = torch.zeros(MiB, device="cuda")
    assert set(allocator.usage_by_tag()) == {"weights", "kv_cache"}
    del weights, kv_cache


@pytest.mark.gpu
def test_expandable_segments_off_inside_and_restored(allocator: CuMemAllocator,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter("expandable_segments:True")
    try:
        with allocator.use_memory_pool("weights"):
            if hasattr(torch._C, "_accelerator_getAllocatorSettings"):  # older torch: only the env is readable
                assert not _expandable_segments_on()
            weights = torch.zeros(32 * MiB, dtype=torch.uint8, device="cuda")
        assert _expandable_segments_on()
        assert allocator.usage_by_tag().get("weights", 0) >= 32 * MiB  # came from CuMem, not torch's segments
    finally:
        setter("expandable_segments:False")
    del weights
