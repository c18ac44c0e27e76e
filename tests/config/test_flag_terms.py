"""A problem about a flag-set value is in the terms the user typed throughout: its hint says "lower --num-gpu-blocks
to N", not the YAML key `cache.num_gpu_blocks` (check-config, serve's refusal, and an instance's start-up error as
the launcher prints it from the instance's log). A problem about a file value keeps the file's keys."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pdlaunch.config.flag_terms import FLAG_NAMES_ENV, flag_names_from_env, in_flag_terms, name_error
from pdlaunch.config.rules import host_memory
from pdlaunch.errors import EngineError, PdlaunchError
from tests.config.cli_helpers import assert_invalid, check, check_json, invoke, write_yaml
from tests.helpers.ports import free_port

GIB = 1 << 30
CPU = ["--model", "tiny", "--device", "cpu"]
TOO_MANY = ["--num-gpu-blocks", "100000"]  # 6.1 GiB per rank of tiny: 12.2 GiB for 1P1D


def free(monkeypatch: pytest.MonkeyPatch, gib: float) -> None:
    monkeypatch.setattr(host_memory, "available_memory_bytes", lambda: int(gib * GIB))


def error_lines(output: str, field: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"error: {field}: ")]


def test_check_config_hint_names_the_flag_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    free(monkeypatch, 8)
    result = check([*CPU, *TOO_MANY])
    assert_invalid(result, "--num-gpu-blocks", "the 2 CPU rank(s) on this machine need about 12.2")
    [line] = error_lines(result.output, "--num-gpu-blocks")
    assert re.search(r"lower --num-gpu-blocks to \d+ or less", line) and "cache.num_gpu_blocks" not in line, line
    [found] = check_json([*CPU, *TOO_MANY])["problems"]
    assert found["field"] == "--num-gpu-blocks" and "cache.num_gpu_blocks" not in found["message"], found


def test_every_flag_set_path_the_hint_names_is_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    free(monkeypatch, 8)
    [line] = error_lines(check([*CPU, *TOO_MANY, "--kv-offload-gb", "1"]).output, "--num-gpu-blocks")
    assert "a smaller --kv-offload-gb" in line and "cache." not in line, line


def test_the_same_values_from_the_file_keep_its_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    free(monkeypatch, 8)
    path = write_yaml(tmp_path, "cache: {num_gpu_blocks: 100000, kv_offload_gb: 1}\n")
    [line] = error_lines(check([str(path), *CPU]).output, "cache.num_gpu_blocks")
    assert "lower cache.num_gpu_blocks to" in line and "a smaller cache.kv_offload_gb" in line, line


def test_a_file_key_hint_is_not_rewritten_to_a_flag(tmp_path: Path) -> None:
    """An unknown key's hint says where the key belongs in the file: the flag setting that key too changes nothing."""
    path = write_yaml(tmp_path, "scheduler: {num_gpu_blocks: 64}\n")
    result = check([str(path), *CPU, "--num-gpu-blocks", "64"])
    assert_invalid(result, "scheduler.num_gpu_blocks", "did you mean `cache.num_gpu_blocks`? (that key lives there)")


def test_serve_refuses_in_the_flag_terms_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    free(monkeypatch, 8)
    logs = tmp_path / "logs"
    served = invoke(["serve", *CPU, *TOO_MANY, "--log-dir", str(logs), "--port", str(free_port())])
    assert served.exit_code == 1, served.output
    [line] = error_lines(served.output, "--num-gpu-blocks")
    assert re.search(r"lower --num-gpu-blocks to \d+ or less", line) and "cache.num_gpu_blocks" not in line, line
    assert not logs.exists()


# Blocks whose KV cache the kernel refuses at once: 2**24 blocks of tiny (64 KiB each) are 1 TiB, more than this
# machine's RAM and swap. The heuristic (0) and strict (2) overcommit modes refuse such an allocation outright; the
# "always" mode (1) would grant it and the zero-fill would then take the machine's memory: not run there.
HUGE_BLOCKS = 2**24
HUGE_BYTES = 1 << 40


def _kernel_refuses(size: int) -> bool:
    try:
        mode = Path("/proc/sys/vm/overcommit_memory").read_text().strip()
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    except OSError:
        return False
    ram_and_swap = sum(int(meminfo[key].split()[0]) * 1024 for key in ("MemTotal", "SwapTotal"))
    return mode in ("0", "2") and size > ram_and_swap


needs_refusal = pytest.mark.skipif(not _kernel_refuses(HUGE_BYTES), reason="the kernel would grant a 1 TiB allocation")


def _start_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str]) -> list[str]:
    """`pdlaunch serve` of one colocated instance whose KV cache the host refuses (the host check told there is
    room): the instance's start-up error lines, as the launcher prints them from its log."""
    free(monkeypatch, 1 << 30)
    served = invoke(["serve", *args, *CPU, "--colocated", "--log-dir", str(tmp_path / "logs"),
                     "--port", str(free_port())])
    assert served.exit_code == 1 and "colocated-0 (pid " in served.output, served.output
    failed = [line for line in served.output.splitlines() if "engine failed to start: " in line]
    assert failed, served.output
    return failed


@needs_refusal
def test_an_instance_start_up_error_names_the_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for line in _start_failure(monkeypatch, tmp_path, ["--num-gpu-blocks", str(HUGE_BLOCKS)]):
        assert f"engine failed to start: --num-gpu-blocks: the KV cache ({HUGE_BLOCKS} blocks, 1024.00 GiB) did " \
               "not fit in host memory: " in line, line
        assert "Cannot allocate memory" in line and "cache.num_gpu_blocks" not in line, line  # the mapping's ENOMEM
    assert FLAG_NAMES_ENV not in os.environ  # handed to the children only while serve ran


@needs_refusal
def test_an_instance_start_up_error_of_a_file_value_names_the_key(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    path = write_yaml(tmp_path, f"cache: {{num_gpu_blocks: {HUGE_BLOCKS}}}\n")
    for line in _start_failure(monkeypatch, tmp_path, [str(path)]):
        assert "engine failed to start: cache.num_gpu_blocks: the KV cache (" in line, line


FLAGS = {"cache.num_gpu_blocks": "--num-gpu-blocks", "instances[0].count": "--prefill", "colocated": "--colocated"}


@pytest.mark.parametrize(("text", "expected"), [
    ("lower cache.num_gpu_blocks to 5.", "lower --num-gpu-blocks to 5."),
    ("`cache.num_gpu_blocks`, instances[0].count", "`--num-gpu-blocks`, --prefill"),
    ("cache.num_gpu_blocks_x and x.cache.num_gpu_blocks", "cache.num_gpu_blocks_x and x.cache.num_gpu_blocks"),
    ("cache.num_gpu_blocks.x, instances[0].count[1], instances[0].countless", "cache.num_gpu_blocks.x, "
     "instances[0].count[1], instances[0].countless"),
    ("every instance is colocated: logs/colocated-0.log", "every instance is colocated: logs/colocated-0.log"),
    ("logs/cache.num_gpu_blocks/x, cache.num_gpu_blocks-1", "logs/cache.num_gpu_blocks/x, cache.num_gpu_blocks-1"),
], ids=["sentence", "quoted", "longer-names", "deeper-paths", "top-level-key", "file-names"])
def test_only_whole_paths_are_rewritten(text: str, expected: str) -> None:
    assert in_flag_terms(text, FLAGS) == expected


def test_an_error_of_another_field_is_left_as_it_is() -> None:
    error = EngineError("no room", field="cache.block_size", hint="lower cache.num_gpu_blocks")
    assert name_error(error, FLAGS) is error and str(error) == "cache.block_size: no room (lower cache.num_gpu_blocks)"


def test_the_names_handed_to_an_instance_are_checked() -> None:
    assert flag_names_from_env({}) == {}
    assert flag_names_from_env({FLAG_NAMES_ENV: '{"cache.num_gpu_blocks": "--num-gpu-blocks"}'}) == {
        "cache.num_gpu_blocks": "--num-gpu-blocks"}
    for raw in ('["--num-gpu-blocks"]', '{"cache.num_gpu_blocks": 3}', '{"cache.num_gpu_blocks": "--num'):
        with pytest.raises(PdlaunchError) as raised:
            flag_names_from_env({FLAG_NAMES_ENV: raw})
        assert raised.value.field == FLAG_NAMES_ENV and "unset it" in (raised.value.hint or ""), raised.value
