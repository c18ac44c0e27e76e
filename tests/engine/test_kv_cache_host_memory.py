"""A CPU instance's KV cache (runner/kv_cache_tensors.py) is zero pages the kernel hands out as they are first
written: building a 1 GiB cache neither writes nor takes its GiB at start. Before, torch.zeros wrote every byte
(~1 s a GiB on an idle core, several seconds for each instance of a deployment starting on a busy 2-core box)."""

from __future__ import annotations

import errno
import gc
import mmap
from pathlib import Path

import pytest
import torch

from pdlaunch.config.engine_config import CacheConfig, SchedulerConfig
from pdlaunch.errors import EngineError
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.runner import kv_cache_tensors
from pdlaunch.runner.model_runner import ModelRunner


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_a_cpu_kv_cache_takes_memory_as_it_is_written_and_reads_as_zeros() -> None:
    checkpoint = load_checkpoint("tiny")
    gc.collect()
    before = _rss_bytes()
    runner = ModelRunner(checkpoint, torch.device("cpu"), torch.float32, CacheConfig(cpu_kv_cache_gb=1.0),
                         SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), max_model_len=64)
    size = sum(kv.numel() * kv.element_size() for kv in runner.kv_caches)
    assert size >= 2**30 * 0.99
    assert _rss_bytes() - before < size // 4  # the weights and the runner's buffers, not the cache
    first, last = runner.kv_caches[0][0], runner.kv_caches[-1][-1]
    assert not first.any() and not last.any()
    first.fill_(1.0)  # writable, and a block is its own memory
    assert bool((runner.kv_caches[0][0] == 1.0).all()) and not runner.kv_caches[0][1].any()
    runner.kv_caches = []
    runner.allocate_kv_caches()  # again (after a sleep discarded the cache): zeros again
    assert not runner.kv_caches[0][0].any()


def test_a_mapping_the_host_refuses_names_the_setting_that_sized_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mapping refused (overcommit limit, ulimit -v: ENOMEM) is the KV cache not fitting in host memory, in one
    line that names cache.cpu_kv_cache_gb; another OSError is not called out of memory."""
    runner = ModelRunner(load_checkpoint("tiny"), torch.device("cpu"), torch.float32, CacheConfig(cpu_kv_cache_gb=0.01),
                         SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), max_model_len=64)
    runner.kv_caches = []

    def refused(*args: object) -> mmap.mmap:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(kv_cache_tensors.mmap, "mmap", refused)
    with pytest.raises(EngineError) as raised:
        runner.allocate_kv_caches()
    assert raised.value.field == "cache.cpu_kv_cache_gb"
    assert raised.value.message.startswith(f"the KV cache ({runner.num_blocks} blocks, ")
    assert "did not fit in host memory: [Errno 12] Cannot allocate memory" in raised.value.message
    assert "`free -g`" in (raised.value.hint or "") and runner.kv_caches == []

    def broken(*args: object) -> mmap.mmap:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(kv_cache_tensors.mmap, "mmap", broken)
    with pytest.raises(OSError, match="Bad file descriptor"):
        runner.allocate_kv_caches()
