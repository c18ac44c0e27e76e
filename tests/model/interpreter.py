"""Triton kernel cases on CPU: a test file's interpreter cases run in a child pytest started with
TRITON_INTERPRET=1 (Triton reads the variable at import, so the parent cannot switch it on)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET") == "1"


def run_interpreter_child(test_file: str, selector: str, passed: str = " passed", timeout: float = 600) -> None:
    """Run `test_file -k selector` under the interpreter in a child pytest; it must pass with `passed` in its
    summary (e.g. "18 passed") and no case skipped as "runs in the child" (-ra lists skip reasons)."""
    pytest.importorskip("triton")
    if INTERPRET_AT_START:
        pytest.skip("this is the child")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selector]
    child = subprocess.run(command, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True,
                           timeout=timeout)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert passed in child.stdout and "runs in the child" not in child.stdout, child.stdout[-3000:]
