"""check-config on a real CUDA host, without target flags: this machine's GPUs, memory and cumem support."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.config.cli_helpers import assert_invalid, check, check_json

pytestmark = pytest.mark.gpu

# 1 prefill + 1 decode sharing GPU 0: valid on any host with at least one GPU.
ONE_GPU_PD = [str(Path(__file__).resolve().parents[2] / "examples" / "gpu-1p1d-single.yaml"), "--device", "cuda"]


def test_demo_on_cuda_is_valid_and_auto_means_cuda() -> None:
    assert check(ONE_GPU_PD).exit_code == 0
    config = check_json(["--model", "tiny", "--device", "auto", "--colocated"])["config"]
    assert config["device"] == "cuda" and config["model"]["dtype"] == "bfloat16"


def test_cumem_and_sleep_mode_are_available_here() -> None:
    assert check([*ONE_GPU_PD, "--enable-cumem-allocator"]).exit_code == 0
    report = check_json([*ONE_GPU_PD, "--enable-sleep-mode"])
    assert report["valid"] and report["config"]["model"]["enable_cumem_allocator"] is True


def test_expandable_segments_rule_on_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert_invalid(check(ONE_GPU_PD), "model.enable_cumem_allocator", "--enable-sleep-mode")
    assert check([*ONE_GPU_PD, "--enable-cumem-allocator"]).exit_code == 0
    assert check(["--model", "tiny", "--device", "cuda", "--colocated"]).exit_code == 0


def test_more_instances_than_this_hosts_gpus() -> None:
    if torch.cuda.device_count() == 1:  # one GPU: instances that name no devices share it
        config = check_json(["--model", "tiny", "--device", "cuda", "--decode", "2"])["config"]
        assert [g["devices"] for g in config["instances"]] == [[0], [0, 0]]
        return
    too_many = str(torch.cuda.device_count() + 1)
    result = check(["--model", "tiny", "--device", "cuda", "--decode", too_many])
    assert_invalid(result, "instances", "this machine has")


def test_memory_budget_uses_this_hosts_gpu_memory() -> None:
    # 1e-5 of even a 141 GiB GPU is ~1.4 MiB, below the demo model's ~9 MiB of weights + KV per instance.
    result = check([*ONE_GPU_PD, "--gpu-memory-utilization", "0.00001"])
    assert_invalid(result, "instances[0]", "GiB per GPU")
