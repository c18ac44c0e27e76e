"""A config path that is no YAML file of a config's size, as check-config and serve read it.

- A FIFO named CONFIG.yaml (no writer) held `pdlaunch check-config` forever in open(): no answer, no timeout.
- A 60 MB file was parsed whole, about two minutes of CPU on a 2-core machine, before any answer.
Now each is refused at once, naming the file, what it is and what to pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.config.cli_helpers import FREE_PORT, assert_invalid, check, invoke

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0  # a loaded 2-core machine: the CLI's imports alone take seconds


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pdlaunch", *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env=env, cwd=REPO, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_fifo_as_the_config_is_refused_at_once(tmp_path: Path, command: str) -> None:
    fifo = tmp_path / "deploy.yaml"
    os.mkfifo(fifo)
    done = run_cli(command, str(fifo), "--log-dir", str(tmp_path / "logs"), *FREE_PORT)
    assert done.returncode == 1, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert f"error: config: {str(fifo)!r} is a named pipe (FIFO), not a regular file" in output, output
    assert "pass the YAML file itself" in output, output


def test_a_config_larger_than_any_deployment_is_refused_before_parsing(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("w") as f:
        f.write("model:\n  path: demo\n")
        f.write("# " + "x" * 1000 + "\n" * 1)
        for _ in range(2100):
            f.write("# " + "x" * 1000 + "\n")
    result = check([str(big), *FREE_PORT])
    assert_invalid(result, "config", "is 2.0 MiB; a deployment config is a few KiB and at most 1 MiB here")


def test_a_config_of_a_real_size_still_loads(tmp_path: Path) -> None:
    fine = tmp_path / "fine.yaml"
    fine.write_text("model:\n  path: tiny\n" + "# a comment line\n" * 2000)
    result = invoke(["check-config", str(fine), "--device", "cpu", *FREE_PORT])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("model", ["demo", "tiny"])
def test_check_config_finds_a_model_cache_serve_cannot_create(tmp_path: Path, model: str) -> None:
    """PDLAUNCH_CACHE_DIR naming a file: check-config said `valid` and serve then stopped with `cannot create the
    demo model cache at ...: [Errno 17] File exists` (a built-in model not fetched or built yet)."""
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file, not a directory\n")
    env = {"PDLAUNCH_CACHE_DIR": str(not_a_dir)}
    for command in ("check-config", "serve"):
        done = subprocess.run([sys.executable, "-m", "pdlaunch", command, "--model", model, "--device", "cpu",
                               "--log-dir", str(tmp_path / "logs"), *FREE_PORT], capture_output=True, text=True,
                              timeout=TIMEOUT, env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=REPO,
                              stdin=subprocess.DEVNULL)
        output = done.stdout + done.stderr
        assert done.returncode == 1 and "Traceback" not in output, output
        assert (f"error: PDLAUNCH_CACHE_DIR: {str(not_a_dir)!r} (where the {model} model is built on first use) "
                "exists and is a file, not a directory") in output, output
        assert "set PDLAUNCH_CACHE_DIR to a directory you can write" in output, output
    assert not (tmp_path / "logs").exists()  # serve stopped before it made anything

