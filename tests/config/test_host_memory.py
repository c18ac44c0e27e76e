"""A CPU deployment that cannot fit in this machine's free memory is refused before anything starts
(config/rules/host_memory.py): weights + the whole KV cache of every CPU rank this machine runs, against
MemAvailable, which each test sets by patching the one function that reads it."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.loader import load_deployment, load_valid_deployment
from pdlaunch.config.model_info import load_model_info
from pdlaunch.config.rules import host_memory
from pdlaunch.config.rules.host_memory import available_memory_bytes as read_available
from pdlaunch.config.rules.security import SECRET_ENV
from pdlaunch.config.validate import validate_deployment
from pdlaunch.errors import ConfigError
from pdlaunch.launcher import backends
from tests.config.cli_helpers import assert_invalid, check, invoke, write_yaml

GIB = 1 << 30
CPU = ["--model", "tiny", "--device", "cpu"]  # float32 weights: about 0.01 GiB per rank
CPU_FIELDS: dict[str, object] = {"model.path": "tiny", "device": "cpu"}  # CPU as load_deployment takes it
KV2 = "cache: {cpu_kv_cache_gb: 2}\n"  # 1P1D: two ranks of 2 GiB each, about 4.02 GiB in all


def free(monkeypatch: pytest.MonkeyPatch, gib: float) -> None:
    monkeypatch.setattr(host_memory, "available_memory_bytes", lambda: int(gib * GIB))


def host_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "CPU rank(s) on this machine" in line]


def suggested(output: str, field: str) -> str:
    """The value the hint suggests for `field`."""
    found = re.search(rf"lower {re.escape(field)} to ([0-9.]+) or less", output)
    assert found, output
    return found.group(1)


def test_refused_naming_the_kv_setting_with_needed_and_available(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    free(monkeypatch, 3)
    result = check([str(write_yaml(tmp_path, KV2)), *CPU])
    assert_invalid(result, "cache.cpu_kv_cache_gb", "the 2 CPU rank(s) on this machine need about 4.0")
    assert ("(weights 0.02 + KV cache 4.00 GiB) but only 3.00 GiB is available (MemAvailable, or a cgroup"
            in result.output)
    assert "each of the 2 ranks allocates it whole" in result.output
    value = suggested(result.output, "cache.cpu_kv_cache_gb")
    fixed = check([str(write_yaml(tmp_path, f"cache: {{cpu_kv_cache_gb: {value}}}\n")), *CPU])
    assert fixed.exit_code == 0 and host_lines(fixed.output) == [], fixed.output  # the value clears the warning


def test_close_to_what_is_available_is_a_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    free(monkeypatch, 4.3)  # 4.02 of 4.3: 93%
    result = check([str(write_yaml(tmp_path, KV2)), *CPU])
    assert result.exit_code == 0, result.output
    assert host_lines(result.output) == [line for line in result.output.splitlines()
                                         if line.startswith("warning: cache.cpu_kv_cache_gb: the 2 CPU rank(s)")]
    assert "93% of the 4.30 GiB available" in result.output and "killed for memory" in result.output


def test_room_to_spare_is_neither(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    free(monkeypatch, 8)
    result = check([str(write_yaml(tmp_path, KV2)), *CPU])
    assert result.exit_code == 0 and host_lines(result.output) == [], result.output
    assert "this machine: 2 CPU rank(s) allocate about 4.02 GiB at start" in result.output
    assert "of 8.00 GiB available" in result.output


def test_every_tp_rank_allocates_the_whole_kv_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    free(monkeypatch, 3)  # 1 GiB of KV per rank (the default): 2 ranks fit, 4 do not
    assert check(CPU).exit_code == 0
    assert_invalid(check([*CPU, "--tp", "2"]), "cache.cpu_kv_cache_gb", "the 4 CPU rank(s) on this machine")


def test_only_the_ranks_of_this_node_count(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Node 0 runs two prefill ranks, node 1 four decode ranks: each node checks its own against its memory
    (before, every node counted all six ranks against its RAM)."""
    monkeypatch.setenv(SECRET_ENV, "host-memory-test-secret-0123456789")
    free(monkeypatch, 3)
    path = write_yaml(tmp_path, "parallel:\n  nodes: [{address: 127.0.0.1}, {address: 127.0.0.2}]\n"
                                "kv_transfer: {side_channel_host: 0.0.0.0}\n"
                                "instances:\n  - {role: prefill, count: 2, node: 0}\n"
                                "  - {role: decode, count: 2, tp: 2, node: 1}\n")
    node0 = check([str(path), *CPU])
    assert node0.exit_code == 0 and "this machine: 2 CPU rank(s)" in node0.output, node0.output
    assert_invalid(check([str(path), *CPU, "--node-rank", "1"]), "cache.cpu_kv_cache_gb",
                   "the 4 CPU rank(s) on this machine")


def test_num_gpu_blocks_sizes_the_cpu_kv_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With cache.num_gpu_blocks set, cpu_kv_cache_gb does nothing: the blocks are what is allocated and named
    (before, 100000 blocks were refused as more KV than cpu_kv_cache_gb's 1 GiB for one sequence)."""
    free(monkeypatch, 8)
    path = write_yaml(tmp_path, "cache: {num_gpu_blocks: 100000}\n")  # 6.1 GiB per rank of tiny
    result = check([str(path), *CPU])
    assert_invalid(result, "cache.num_gpu_blocks", "the 2 CPU rank(s) on this machine need about 12.2")
    assert "cpu_kv_cache_gb" not in result.output and "100000 blocks (cpu kv)" in result.output
    value = suggested(result.output, "cache.num_gpu_blocks")
    fixed = check([str(write_yaml(tmp_path, f"cache: {{num_gpu_blocks: {value}}}\n")), *CPU])
    assert fixed.exit_code == 0 and host_lines(fixed.output) == [], fixed.output


def test_weights_alone_too_large_name_the_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    free(monkeypatch, 0.01)  # less than the two ranks' weights
    result = check(CPU)
    assert_invalid(result, "instances", "the 2 CPU rank(s) on this machine need about")
    assert "run fewer instances on this machine or spread them over parallel.nodes" in result.output
    assert "--dtype bfloat16" in result.output


def test_the_kv_offload_tier_counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    free(monkeypatch, 6)
    path = write_yaml(tmp_path, "cache: {kv_offload_gb: 2}\n")  # one tier per instance: 4 GiB + 2 GiB of KV
    result = check([str(path), *CPU])
    assert_invalid(result, "cache.cpu_kv_cache_gb", "+ KV offload tier 4.00 GiB")
    assert "or a smaller cache.kv_offload_gb" in result.output


def test_serve_refuses_before_starting_anything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    free(monkeypatch, 3)
    started: list[DeploymentConfig] = []  # a deployment that got past the checks is recorded, not run
    monkeypatch.setattr(backends, "run_deployment", lambda cfg: started.append(cfg) or 0)
    logs = tmp_path / "logs"
    served = invoke(["serve", str(write_yaml(tmp_path, KV2)), *CPU, "--log-dir", str(logs)])
    assert served.exit_code == 1 and started == [], served.output
    assert "error: cache.cpu_kv_cache_gb: the 2 CPU rank(s) on this machine need about 4.0" in served.output
    assert not logs.exists()


def test_serve_warns_when_close(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                caplog: pytest.LogCaptureFixture) -> None:
    free(monkeypatch, 4.3)
    caplog.set_level(logging.WARNING, logger="pdlaunch.config.loader")
    load_valid_deployment(write_yaml(tmp_path, KV2), CPU_FIELDS)
    assert any("warning: cache.cpu_kv_cache_gb: the 2 CPU rank(s)" in r.getMessage() for r in caplog.records)
    free(monkeypatch, 3)
    with pytest.raises(ConfigError) as err:
        load_valid_deployment(write_yaml(tmp_path, KV2), CPU_FIELDS)
    assert [field for field, _ in err.value.problems] == ["cache.cpu_kv_cache_gb"]


def test_ray_places_the_ranks_on_its_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    free(monkeypatch, 0.01)
    problems, resolved = validate_deployment(load_deployment(write_yaml(tmp_path, "device: cpu\n"), CPU_FIELDS),
                                             target=None)
    assert [field for field, _ in problems] == ["instances"]
    resolved.launcher.backend = "ray"  # its actors run where Ray places them, not on this machine
    assert host_memory.host_memory_findings(resolved, load_model_info("tiny")[0]) == ([], [])


def test_mem_available_is_read_from_meminfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The reader itself (memory/host_devices.py; cgroup limits: tests/offload/test_cpu_tier_size.py)."""
    from pdlaunch.memory import host_devices

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684092 kB\nMemFree:         1000000 kB\nMemAvailable:    2097152 kB\n")
    monkeypatch.setattr(host_devices, "MEMINFO", meminfo)
    monkeypatch.setattr(host_devices, "PROC_CGROUP", tmp_path / "no-cgroup")  # no memory limit
    assert read_available() == 2 * GIB
    meminfo.write_text("MemTotal:       24684092 kB\nMemFree:         1000000 kB\n")  # a kernel before 3.14
    physical = read_available()
    assert physical == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # the machine's RAM
    monkeypatch.setattr(host_devices, "MEMINFO", tmp_path / "absent")
    assert read_available() == physical


# -- GPU deployments: the KV offload tiers live in this machine's memory -------------------------------------------

def gpu_host(monkeypatch: pytest.MonkeyPatch, gpus: int = 2) -> None:
    """This machine as a CUDA host of `gpus` 80 GiB GPUs."""
    from pdlaunch.memory import host_devices

    monkeypatch.setattr(host_devices, "cuda_available", lambda: True)
    monkeypatch.setattr(host_devices, "device_count", lambda: gpus)
    monkeypatch.setattr(host_devices, "device_total_bytes", lambda index=0: 80 * GIB)
    monkeypatch.setattr(host_devices, "is_cumem_allocator_available", lambda: True)


GPU = ["--model", "tiny", "--device", "cuda"]


def offload_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "GPU instance(s) on this machine" in line]


def test_gpu_offload_tiers_past_what_is_available_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """1P1D on two GPUs, a 3 GiB tier each (TP 1: one per instance, in its engine process): 6 GiB of host memory
    against 5 available (before, a GPU deployment's tiers were not checked at all)."""
    gpu_host(monkeypatch)
    free(monkeypatch, 5)
    result = check([*GPU, "--kv-offload-gb", "3"])
    assert_invalid(result, "--kv-offload-gb", "the 2 GPU instance(s) on this machine keep a KV offload tier of "
                   "3.00 GiB each in host memory, 6.00 GiB in all, but only 5.00 GiB is available")
    assert "each of the 2 instances allocates it whole" in result.output
    value = suggested(result.output, "--kv-offload-gb")  # the flag, as typed
    assert value == "2.25"  # 90% of 5 GiB over two instances
    fixed = check([*GPU, "--kv-offload-gb", value])
    assert fixed.exit_code == 0 and offload_lines(fixed.output) == [], fixed.output
    assert "this machine: 2 GPU instance(s) keep KV offload tiers of 4.50 GiB in all of 5.00 GiB available" \
        in fixed.output


def test_gpu_offload_tiers_close_to_what_is_available_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_host(monkeypatch)
    free(monkeypatch, 6.5)  # 6 of 6.5: 92%
    result = check([*GPU, "--kv-offload-gb", "3"])
    assert result.exit_code == 0, result.output
    assert [line.split(":")[0] for line in offload_lines(result.output)] == ["warning"]
    assert "92% of the 6.50 GiB available" in result.output


def test_gpu_deployment_without_offload_is_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_host(monkeypatch)
    free(monkeypatch, 0.01)
    result = check(GPU)
    assert result.exit_code == 0 and offload_lines(result.output) == [], result.output
    assert "this machine:" not in result.output


def test_gpu_offload_tiers_of_this_node_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Node 0 runs one prefill, node 1 three decodes: each node counts its own instances' tiers."""
    monkeypatch.setenv(SECRET_ENV, "host-memory-test-secret-0123456789")
    gpu_host(monkeypatch, gpus=4)
    free(monkeypatch, 5)
    path = write_yaml(tmp_path, "parallel:\n  nodes: [{address: 127.0.0.1}, {address: 127.0.0.2}]\n"
                                "kv_transfer: {side_channel_host: 0.0.0.0}\ncache: {kv_offload_gb: 2}\n"
                                "instances:\n  - {role: prefill, count: 1, node: 0}\n"
                                "  - {role: decode, count: 3, node: 1}\n")
    node0 = check([str(path), *GPU])
    assert node0.exit_code == 0 and "this machine: 1 GPU instance(s) keep KV offload tiers of 2.00 GiB" \
        in node0.output, node0.output
    assert_invalid(check([str(path), *GPU, "--node-rank", "1"]), "cache.kv_offload_gb",
                   "the 3 GPU instance(s) on this machine")


def test_gpu_offload_against_a_target_host_is_not_this_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    free(monkeypatch, 0.01)
    result = check(["--model", "tiny", "--target-gpus", "2", "--target-gpu-memory", "80", "--kv-offload-gb", "3"])
    assert result.exit_code == 0 and offload_lines(result.output) == [], result.output


def test_serve_refuses_gpu_offload_tiers_that_do_not_fit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gpu_host(monkeypatch)
    free(monkeypatch, 5)
    started: list[DeploymentConfig] = []
    monkeypatch.setattr(backends, "run_deployment", lambda cfg: started.append(cfg) or 0)
    served = invoke(["serve", *GPU, "--kv-offload-gb", "3", "--log-dir", str(tmp_path / "logs")])
    assert served.exit_code == 1 and started == [], served.output
    assert "--kv-offload-gb: the 2 GPU instance(s) on this machine keep a KV offload tier" in served.output
