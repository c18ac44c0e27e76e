"""Loading a script under benchmarks/ as a module in a test (the scripts are not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(script: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Runs `script`'s module level (each script runs from its __main__ guard) as module `name`, with the
    benchmarks directory importable (the scripts import their siblings: limits, ready_kv); both the module
    registration and the path are undone after the test."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module
