"""Every script under benchmarks/ imports against the package as it is now (a module moved or renamed
inside pdlaunch/ breaks a benchmark's imports long before anyone runs it on a GPU host)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.benchmark_scripts import BENCHMARKS, load_benchmark

SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def test_there_are_benchmark_scripts() -> None:
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_imports(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark(script, f"_bench_{script.stem}", monkeypatch)
    if script.stem not in ("decode_sweep", "ready_kv", "limits", "hop_client"):  # helpers the scripts import
        assert callable(getattr(module, "main", None)), f"{script.name} has no main()"


def test_no_script_puts_its_tree_ahead_of_pythonpath() -> None:
    """A script may put its own directory first (its siblings: limits, ready_kv), but the repository root only
    after PYTHONPATH: comparing two trees on a GPU host runs one tree's scripts with the other on PYTHONPATH, and
    a root inserted first silently ran the scripts' own tree instead (benchmarks/RESULTS.md, eighteenth session)."""
    import re

    ahead = re.compile(r"sys\.path\.insert\(0, (?!str\(Path\(__file__\)\.resolve\(\)\.parent\)\))")
    offenders = [f"{script.name}:{n}" for script in SCRIPTS
                 for n, line in enumerate(script.read_text().splitlines(), 1) if ahead.search(line)]
    assert offenders == []
