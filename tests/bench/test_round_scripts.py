"""The GPU round scripts (benchmarks/*.sh) parse, and their parts hand the right flags to the commands they run.

A script that breaks on a GPU host costs device time before it shows: each part here runs with PYTHON=echo, so
`step` logs the command line it would have run (benchmarks/steps.sh) and nothing starts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.benchmark_scripts import BENCHMARKS

SCRIPTS = sorted(BENCHMARKS.glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_round_script_parses(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# The scripts' settings, unset here unless a test gives them (a developer's shell may hold some).
SETTINGS = ("LOGS", "BASELINE", "MAX_QUEUE", "MAX_ITL", "COMPARE_CONFIG", "SWEEP", "CAPS", "KS", "DEVICES", "RATES",
            "NUM_PROMPTS", "DURATION")


def _dry_run(script: str, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`bash benchmarks/SCRIPT OUT ARGS` with PYTHON=echo (and CKPT=tiny: no checkpoint is written)."""
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    return subprocess.run(["bash", str(BENCHMARKS / script), str(out), *args], capture_output=True, text=True,
                          timeout=120, cwd=BENCHMARKS.parent,
                          env={**clean, "PYTHON": "echo", "CKPT": "tiny", "MOE_CKPT": "tiny", **env})


def _command(log: Path) -> str:
    """The command line a step logged (PYTHON=echo prints its arguments)."""
    return " ".join(log.read_text().split())


def test_mixed_sweep_runs_each_setting_beside_the_first_run(tmp_path: Path) -> None:
    result = _dry_run("two_gpu_round.sh", tmp_path, "mixed-sweep", SWEEP="8192: 4096:8", RATES="20,24",
                      NUM_PROMPTS="32", MAX_QUEUE="12288")
    assert result.returncode == 0, result.stdout + result.stderr
    first = _command(tmp_path / "mixed.log")
    assert "--rates 20,24 --num-prompts 32 --input-lens 64,3072" in first
    assert "--disaggregate-max-queue-tokens 12288" in first and "--baseline" not in first
    queue_only = _command(tmp_path / "sweep-8192-" / "mixed.log")
    assert "--disaggregate-max-queue-tokens 8192" in queue_only and "--disaggregate-max-itl-ms" not in queue_only
    assert f"--baseline {tmp_path}/mixed" in queue_only
    both = _command(tmp_path / "sweep-4096-8" / "mixed.log")
    assert "--disaggregate-max-queue-tokens 4096 --disaggregate-max-itl-ms 8" in both
    assert "== sweep 4096:8: no compare.json" in result.stdout  # nothing ran, so no table to copy up


def test_mixed_caps_runs_all_three_deployments_under_each_cap(tmp_path: Path) -> None:
    result = _dry_run("two_gpu_round.sh", tmp_path, "mixed-caps", CAPS="360 1024", RATES="20")
    assert result.returncode == 0, result.stdout + result.stderr
    for cap in (360, 1024):
        config = tmp_path / f"cap-{cap}.yaml"
        assert config.read_text() == f"scheduler:\n  prompt_tokens_while_decoding: {cap}\n"
        command = _command(tmp_path / f"cap-{cap}" / "mixed.log")
        assert f"--config {config}" in command and "--baseline" not in command  # colocated and PD run again
        assert f"--out {tmp_path}/cap-{cap}/mixed" in command


def test_duration_replaces_the_request_count(tmp_path: Path) -> None:
    result = _dry_run("two_gpu_round.sh", tmp_path, "mixed", DURATION="15", NUM_PROMPTS="32")
    assert result.returncode == 0, result.stdout + result.stderr
    command = _command(tmp_path / "mixed.log")
    assert "--duration 15 --input-lens 64,3072" in command and "--num-prompts" not in command


def test_an_unknown_part_is_refused_naming_the_parts(tmp_path: Path) -> None:
    result = _dry_run("two_gpu_round.sh", tmp_path, "mixed-cap")
    assert result.returncode == 2 and "unknown PART mixed-cap: kv | compare | mixed | mixed-sweep | mixed-caps" \
        in result.stdout


def test_kv_concurrency_round_times_each_dtype_and_concurrency(tmp_path: Path) -> None:
    result = _dry_run("kv_concurrency_round.sh", tmp_path, KS="1 4")
    assert result.returncode == 0, result.stdout + result.stderr
    logs = sorted(p.name for p in tmp_path.glob("*.log"))
    assert logs == ["kv-bf16-k1-r1.log", "kv-bf16-k1-r2.log", "kv-bf16-k4-r1.log", "kv-bf16-k4-r2.log",
                    "kv-fp8-k1-r1.log", "kv-fp8-k4-r1.log"]  # bf16 before and after fp8
    command = _command(tmp_path / "kv-fp8-k4-r1.log")
    assert "bench kv-transfer --device cuda:0 --mode push --num-tokens 1024 --num-tokens 8192" in command
    assert "--concurrency 4 --kv-cache-dtype fp8" in command and f"--json {tmp_path}/kv-fp8-k4-r1.json" in command
