"""Sleep mode and the cumem allocator asked of a `device: cuda` deployment on a machine without a usable CUDA
device: the problem says so, instead of telling the user (whose device is already cuda) to `use --device cuda`, as
check-config of examples/sleep-mode.yaml on a CPU machine did."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.memory.host_devices import is_cumem_allocator_available
from tests.config.cli_helpers import assert_invalid, check

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.skipif(is_cumem_allocator_available(), reason="this machine has CUDA: nothing is refused")


def _lines(output: str, field: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"error: {field}:")]


@pytest.mark.parametrize(("flag", "what"), [("--enable-sleep-mode", "sleep mode"),
                                            ("--enable-cumem-allocator", "cumem allocator")])
def test_device_cuda_without_cuda_names_the_machine_not_the_device(flag: str, what: str) -> None:
    result = check(["--model", "tiny", "--device", "cuda", flag])
    assert_invalid(result, flag, f"{what} is not supported on current platform")
    line = _lines(result.output, flag)[0]
    assert "use --device cuda" not in line, line
    assert "this machine has no usable CUDA device" in line, line
    assert f"drop {flag}" in line and "--target-gpus N --target-gpu-memory GIB" in line, line


def test_the_sleep_mode_example_on_a_cpu_machine() -> None:
    result = check([str(EXAMPLES / "sleep-mode.yaml")])
    assert_invalid(result, "model.enable_sleep_mode", "this machine has no usable CUDA device")
    assert "use --device cuda" not in result.output, result.output


def test_device_cpu_still_points_at_cuda() -> None:
    result = check(["--model", "tiny", "--device", "cpu", "--enable-sleep-mode"])
    assert_invalid(result, "--enable-sleep-mode", "it needs CUDA (device is cpu); drop --enable-sleep-mode or use "
                   "--device cuda")


@pytest.mark.parametrize("cache", [[], ["--num-gpu-blocks", "128"]])
def test_the_memory_budget_of_a_cuda_config_is_unknown_here_not_the_cpu_kv_cache(cache: list[str]) -> None:
    """The memory table's budget of a `device: cuda` config checked without a GPU read "1 (cpu kv)" (the CPU KV
    cache's size, which a cuda instance does not use) or "128 blocks (cpu kv)"; it is a GPU host's, unknown here."""
    result = check(["--model", "tiny", "--device", "cuda", *cache])
    rows = [line for line in result.output.splitlines() if line.count("│") == 7]  # the memory table's 6 columns
    assert len(rows) == 2 and all(row.rstrip(" │").endswith("unknown: no GPU here") for row in rows), result.output
    assert "cpu kv" not in result.output, result.output
    target = check(["--model", "tiny", "--device", "cuda", *cache, "--target-gpus", "2", "--target-gpu-memory", "80"])
    assert target.exit_code == 0 and "72.00" in target.output, target.output  # 0.9 x 80 GiB
