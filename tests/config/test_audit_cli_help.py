"""The help of a flag whose default differs by role, and the example config, say the defaults the code uses."""

from __future__ import annotations

from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.config.engine_config import DECODE_TOKEN_BUDGET, PROMPT_TOKEN_BUDGET, SchedulerConfig


def test_max_num_batched_tokens_help_gives_the_defaults_of_each_role() -> None:
    scheduler = SchedulerConfig()
    assert (scheduler.token_budget("prefill"), scheduler.token_budget("decode")) == (PROMPT_TOKEN_BUDGET,
                                                                                     DECODE_TOKEN_BUDGET)
    said = f"default {PROMPT_TOKEN_BUDGET} colocated and prefill, {DECODE_TOKEN_BUDGET} decode"
    shown = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "1000"}, terminal_width=1000).output
    assert said in " ".join(shown.split()), shown
    example = CliRunner().invoke(app, ["config", "example"]).output
    line = next(line for line in example.splitlines() if "max_num_batched_tokens" in line)
    assert said in line, line
