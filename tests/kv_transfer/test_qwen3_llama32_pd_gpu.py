"""PD on CUDA with real NIXL for Qwen3 (tied, sliding layers) and the Llama 3.2 shape: decode's
greedy ids equal a colocated engine's on the same device (fused kernels, Triton decode and CUDA
graphs on both sides), every held block comes back. One GPU shared (push), two GPUs (auto)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.kv_transfer.test_pd_engines import check_pd, pd_pair

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]


@pytest.mark.parametrize("fixture", ["qwen3_tied_ckpt", "llama32_ckpt"])
@pytest.mark.parametrize("devices", [(0, 0), (0, 1)], ids=["one-gpu-push", "two-gpus-auto"])
def test_pd_on_cuda_equals_colocated(fixture: str, devices: tuple[int, int], request: pytest.FixtureRequest) -> None:
    if torch.cuda.device_count() < len(set(devices)):
        pytest.skip(f"needs {len(set(devices))} CUDA devices, found {torch.cuda.device_count()}")
    model: Path = request.getfixturevalue(fixture)
    mode = "push" if devices[0] == devices[1] else "auto"  # pull on one GPU needs NVLink to itself
    for prefill, decode in pd_pair(model, "nixl", mode, device="cuda", devices=devices):
        check_pd(model, prefill, decode, "nixl", device="cuda")
