"""Weights or a KV cache that run out of device memory at start (runner/model_runner.py, kv_cache_tensors.py): an
EngineError naming the field to change, not torch's OutOfMemoryError and its traceback."""

from __future__ import annotations

import pytest
import torch

from pdlaunch.config.engine_config import CacheConfig, SchedulerConfig
from pdlaunch.errors import EngineError
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.runner import kv_cache_tensors, model_runner
from pdlaunch.runner.model_runner import ModelRunner


def test_kv_cache_out_of_memory_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = ModelRunner(load_checkpoint("tiny"), torch.device("cpu"), torch.float32, CacheConfig(num_gpu_blocks=32),
                         SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), max_model_len=64)

    def no_memory(*args: object, **kwargs: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 33.55 GiB.\nmore lines")

    monkeypatch.setattr(kv_cache_tensors, "zeros", no_memory)
    with pytest.raises(EngineError) as raised:
        runner.allocate_kv_caches()
    assert raised.value.field == "cache.num_gpu_blocks"  # the block count was given: that is what to lower
    assert "KV cache (32 blocks" in raised.value.message and "Tried to allocate 33.55 GiB" in raised.value.message
    assert "more lines" not in raised.value.message
    assert runner.kv_caches == []  # nothing half-made is kept


# torch's allocator running out, and the CUDA runtime itself (what an H100 with 1.5 GiB left raised: a kernel's first
# launch, after its tensor had been allocated, could not load the kernel's module)
ALLOCATOR = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.96 GiB.\nmore lines")
RUNTIME = torch.AcceleratorError("CUDA error: out of memory\nSearch for `cudaErrorMemoryAllocation' in ...")


@pytest.mark.parametrize("error", [ALLOCATOR, RUNTIME], ids=["allocator", "runtime"])
def test_weights_out_of_memory_name_the_model(monkeypatch: pytest.MonkeyPatch, error: RuntimeError) -> None:
    def no_memory(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(model_runner, "load_model", no_memory)
    with pytest.raises(EngineError) as raised:
        ModelRunner(load_checkpoint("tiny"), torch.device("cpu"), torch.float32, CacheConfig(num_gpu_blocks=32),
                    SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), max_model_len=64)
    assert raised.value.field == "model.path"
    assert raised.value.message == "the model's weights did not fit in GPU memory: " + str(error).splitlines()[0]
    assert "--tp" in (raised.value.hint or "") and "--quantization fp8" in (raised.value.hint or "")


def test_other_runtime_errors_while_loading_are_not_called_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(model_runner, "load_model", broken)
    with pytest.raises(torch.AcceleratorError, match="illegal memory access"):
        ModelRunner(load_checkpoint("tiny"), torch.device("cpu"), torch.float32, CacheConfig(num_gpu_blocks=32),
                    SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), max_model_len=64)


HOST_REFUSED = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                            "you tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize(("cache", "field"), [(CacheConfig(num_gpu_blocks=32), "cache.num_gpu_blocks"),
                                              (CacheConfig(cpu_kv_cache_gb=0.01), "cache.cpu_kv_cache_gb")],
                         ids=["num_gpu_blocks", "cpu_kv_cache_gb"])
def test_a_kv_cache_the_host_refuses_names_the_setting_that_sized_it(monkeypatch: pytest.MonkeyPatch,
                                                                     cache: CacheConfig, field: str) -> None:
    """A CPU instance's KV cache the kernel will not give (its overcommit limit, a ulimit -v): before, torch's
    RuntimeError, named after nothing."""
    runner = ModelRunner(load_checkpoint("tiny"), torch.device("cpu"), torch.float32, cache,
                         SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), max_model_len=64)

    def refused(*args: object, **kwargs: object) -> torch.Tensor:
        raise HOST_REFUSED

    monkeypatch.setattr(kv_cache_tensors, "zeros", refused)
    with pytest.raises(EngineError) as raised:
        runner.allocate_kv_caches()
    assert raised.value.field == field
    assert raised.value.message.startswith(f"the KV cache ({runner.num_blocks} blocks, ")
    assert "did not fit in host memory: [enforce fail" in raised.value.message
    assert "`free -g`" in (raised.value.hint or "") and runner.kv_caches == []


def test_other_runtime_errors_of_the_kv_cache_are_not_called_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = ModelRunner(load_checkpoint("tiny"), torch.device("cpu"), torch.float32, CacheConfig(num_gpu_blocks=32),
                         SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), max_model_len=64)

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("trying to create tensor with negative dimension -1")

    monkeypatch.setattr(kv_cache_tensors, "zeros", broken)
    with pytest.raises(RuntimeError, match="negative dimension"):
        runner.allocate_kv_caches()
