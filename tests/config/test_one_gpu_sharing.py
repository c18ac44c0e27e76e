"""On a one-GPU host a deployment that names no devices shares GPU 0 (what `make serve` needs there)."""

from __future__ import annotations

from tests.config.cli_helpers import assert_invalid, check, check_json

ONE_GPU = ["--device", "cuda", "--target-gpus", "1", "--target-gpu-memory", "80"]


def test_default_pd_shares_the_one_gpu_and_splits_its_memory() -> None:
    report = check_json(["--model", "tiny", *ONE_GPU])
    assert report["valid"], report["problems"]
    config = report["config"]
    assert [(g["role"], g["devices"]) for g in config["instances"]] == [("prefill", [0]), ("decode", [0])]
    assert config["cache"]["gpu_memory_utilization"] == 0.45


def test_three_instances_get_a_third_each_and_a_lower_setting_is_kept() -> None:
    config = check_json(["--model", "tiny", *ONE_GPU, "--decode", "2"])["config"]
    assert [g["devices"] for g in config["instances"]] == [[0], [0, 0]]
    assert config["cache"]["gpu_memory_utilization"] == 0.3
    config = check_json(["--model", "tiny", *ONE_GPU, "--gpu-memory-utilization", "0.2"])["config"]
    assert config["cache"]["gpu_memory_utilization"] == 0.2


def test_no_sharing_with_explicit_devices_tp_or_two_gpus() -> None:
    # TP 2 cannot fit one GPU: still refused, naming the TP flag.
    assert_invalid(check(["--model", "tiny", *ONE_GPU, "--tp", "2"]), "--tp", "GPUs")
    two = ["--model", "tiny", "--device", "cuda", "--target-gpus", "2", "--target-gpu-memory", "80"]
    config = check_json([*two])["config"]
    assert all(g["devices"] is None for g in config["instances"])  # the launcher gives each its own GPU
    assert_invalid(check([*two, "--decode", "2"]), "instances", "needs 3 GPUs")
