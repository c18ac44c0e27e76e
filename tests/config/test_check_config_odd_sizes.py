"""check-config on a count too large to run and on a key that is no valid Unicode: the problem, exit 1, never an
exception out of the command (the summary table made a number for each of 10**20 instances; the salvage of a
partial config assumed every error had a field)."""

from __future__ import annotations

from pathlib import Path

from tests.config.cli_helpers import check


def test_a_count_too_large_to_run_is_a_problem_not_an_overflow() -> None:
    result = check(["--device", "cpu", "--decode", str(10**20)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert "error: --decode: 100000000000000000000 instances x TP 1" in text, text


def test_a_key_that_is_no_valid_unicode_is_a_problem(tmp_path: Path) -> None:
    config = tmp_path / "surrogate.yaml"
    config.write_text('"\\ud800": 1\n')  # YAML's escape for a lone surrogate: no UTF-8 string can hold it
    result = check([str(config)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert "error: config: '\\ud800' in " in text and "at line 1, column 1 holds a lone UTF-16 surrogate escape" in text
