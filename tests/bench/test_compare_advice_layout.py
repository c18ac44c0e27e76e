"""`bench compare`'s P:D advisor block in an 80-column terminal: its sentence and its note on
prompt_tokens_while_decoding run the terminal's width, not squeezed into the three-column table's (a dozen centred
lines of 40 characters), and the note names the decode batch it was taken at as measured, not rounded."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from pdlaunch.bench import compare_report
from pdlaunch.bench.advisor import DecodePoint, advise
from tests.bench.test_compare_report import _cfg, _runs


def _report(tmp_path: Path, points: list[DecodePoint]) -> str:
    advice = advise(2, 3000, 100, 15.0, 30000.0, points, 64)
    console = Console(width=80, record=True)
    compare_report.report_comparison(console, _cfg(tmp_path), _runs(), advice)
    return console.export_text()


def test_the_sentence_and_the_note_are_as_wide_as_the_terminal(tmp_path: Path) -> None:
    text = _report(tmp_path, [DecodePoint(batch=16, step_ms=7.0), DecodePoint(batch=64, step_ms=13.0)])
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("P:D advisor: "))
    assert len(lines[start]) > 60, lines[start]
    note = next(i for i, line in enumerate(lines) if "prompt tokens a step" in line)
    assert len(lines[note].strip()) > 60 and lines[note] == lines[note].lstrip(), lines[note]
    assert ["4", "4.00", "3.80"] in [line.split() for line in lines]  # the table itself is still there


def test_a_fractional_decode_batch_is_named_as_measured(tmp_path: Path) -> None:
    # a CPU run's decode held 1.6 streams on average: the cap is taken there, not at 2
    text = " ".join(_report(tmp_path, [DecodePoint(batch=1.2, step_ms=4.0), DecodePoint(batch=1.6, step_ms=5.0)])
                    .split())
    assert "keep 1.6 streams within TPOT 15 ms" in text, text
