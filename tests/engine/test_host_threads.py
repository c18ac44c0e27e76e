"""A GPU instance serves with one OpenMP thread for its host-side tensor ops (runner/host_threads.py); a CPU
instance, or one whose user set OMP_NUM_THREADS, keeps its pool."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pdlaunch.runner.host_threads import SERVING_THREADS, settle_host_threads
from tests.engine.conftest import MakeEngine


@pytest.fixture
def threads_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Start from a pool of several threads (so the change is visible on any machine) and give the pool back."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def test_a_gpu_device_serves_with_one_thread(threads_restored: int) -> None:
    assert settle_host_threads(torch.device("cuda", 0)) == SERVING_THREADS == 1
    assert torch.get_num_threads() == 1


def test_a_cpu_instance_keeps_its_pool(threads_restored: int) -> None:
    assert settle_host_threads(torch.device("cpu")) is None
    assert torch.get_num_threads() == threads_restored


def test_the_users_omp_num_threads_is_left_alone(threads_restored: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert settle_host_threads(torch.device("cuda", 0)) is None
    assert torch.get_num_threads() == threads_restored


def test_a_cpu_engine_keeps_its_pool(threads_restored: int, llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    make_engine(llama_ckpt, max_num_seqs=2)
    assert torch.get_num_threads() == threads_restored


@pytest.mark.gpu
def test_a_gpu_engine_serves_with_one_thread(threads_restored: int, llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    make_engine(llama_ckpt, device="cuda", max_num_seqs=2)
    assert torch.get_num_threads() == 1
