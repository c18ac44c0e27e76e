"""PD on CUDA with real NIXL (make test-gpu): one GPU shared (push; pull needs NVLink), two GPUs.

The device each process uses is the instance's `devices[0]`; outputs must equal a colocated
engine's on the same device, and every held or loading block comes back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.kv_transfer.test_pd_engines import check_pd, pd_pair

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]


def _need_gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} CUDA devices, found {torch.cuda.device_count()}")


@pytest.mark.parametrize("mode", ["auto", "push"])
def test_pd_sharing_one_gpu(llama_ckpt: Path, mode: str) -> None:
    _need_gpus(1)
    for prefill, decode in pd_pair(llama_ckpt, "nixl", mode, device="cuda", devices=(0, 0)):
        check_pd(llama_ckpt, prefill, decode, "nixl", device="cuda")
        info = decode.call("info")
        assert info["transfer_mode"] == "push", info
        if mode == "auto":
            assert "share GPU" in info["transfer_mode_reason"]


@pytest.mark.parametrize("mode", ["auto", "pull", "push"])
def test_pd_across_two_gpus(llama_ckpt: Path, mode: str) -> None:
    _need_gpus(2)
    for prefill, decode in pd_pair(llama_ckpt, "nixl", mode, device="cuda", devices=(0, 1)):
        check_pd(llama_ckpt, prefill, decode, "nixl", device="cuda")
        info = decode.call("info")
        if mode != "auto":
            assert info["transfer_mode"] == mode
        else:
            assert info["transfer_mode"] in ("pull", "push") and info["transfer_mode_reason"]


def test_storage_loads_onto_the_cache_device(llama_ckpt: Path, tmp_path: Path) -> None:
    _need_gpus(1)
    for prefill, decode in pd_pair(llama_ckpt, "storage", "auto", str(tmp_path), device="cuda", devices=(0, 0)):
        check_pd(llama_ckpt, prefill, decode, "storage", device="cuda")


@pytest.mark.parametrize("devices", [(0, 0), (0, 1)], ids=["one-gpu", "two-gpus"])
def test_pd_with_cumem_kv_moves_through_staging(llama_ckpt: Path, devices: tuple[int, int]) -> None:
    from pdlaunch.memory.platform import is_cumem_allocator_available

    _need_gpus(max(devices) + 1)
    if not is_cumem_allocator_available():
        pytest.skip("the CuMem allocator is not available on this host")
    for prefill, decode in pd_pair(llama_ckpt, "nixl", "auto", device="cuda", devices=devices,
                                   enable_cumem_allocator=True):
        check_pd(llama_ckpt, prefill, decode, "nixl", device="cuda")
        for side in (prefill, decode):
            assert side.call("info")["staging"]["slots"] > 0
