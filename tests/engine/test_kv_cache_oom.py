"""Weights or a KV cache that run out of device memory at start (runner/model_runner.py): an EngineError naming
the field to change, not torch's OutOfMemoryError and its traceback."""

from __future__ import annotations

import pytest
import torch

from pdlaunch.config.models import CacheConfig, SchedulerConfig
from pdlaunch.errors import EngineError
from pdlaunch.model.loader import load_checkpoint
from pdlaunch.runner import model_runner
from pdlaunch.runner.model_runner import ModelRunner


def test_kv_cache_out_of_memory_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = ModelRunner(load_checkpoint("tiny"), torch.device("cpu"), torch.float32, CacheConfig(num_gpu_blocks=32),
                         SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), max_model_len=64)

    def no_memory(*args: object, **kwargs: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 33.55 GiB.\nmore lines")

    monkeypatch.setattr(model_runner.torch, "zeros", no_memory)
    with pytest.raises(EngineError) as raised:
        runner.allocate_kv_caches()
    assert raised.value.field == "cache.num_gpu_blocks"  # the block count was given: that is what to lower
    assert "KV cache (32 blocks" in raised.value.message and "Tried to allocate 33.55 GiB" in raised.value.message
    assert "more lines" not in raised.value.message
    assert runner.kv_caches == []  # nothing half-made is kept


def test_weights_out_of_memory_name_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.96 GiB.\nmore lines")

    monkeypatch.setattr(model_runner, "load_model", no_memory)
    with pytest.raises(EngineError) as raised:
        ModelRunner(load_checkpoint("tiny"), torch.device("cpu"), torch.float32, CacheConfig(num_gpu_blocks=32),
                    SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), max_model_len=64)
    assert raised.value.field == "model.path"
    assert raised.value.message == ("the model's weights did not fit in GPU memory: CUDA out of memory. "
                                    "Tried to allocate 1.96 GiB.")
    assert "--tp" in (raised.value.hint or "") and "--quantization fp8" in (raised.value.hint or "")
