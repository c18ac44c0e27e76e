"""The README's `bench serve` row says when a request counts as completed, in the terms openai_client.py applies."""

from __future__ import annotations

from pathlib import Path

from pdlaunch.bench.openai_client import CUT_SHORT

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_bench_serve_row_says_what_completed_means() -> None:
    row = next(line for line in README.splitlines() if line.startswith("| `pdlaunch bench serve"))
    reasons = "/".join(sorted(CUT_SHORT))
    assert ("a request counts as completed only if its stream reaches `[DONE]`, the server did not end it with "
            f"finish_reason {reasons}, and its usage does not count 0 completion tokens") in row
