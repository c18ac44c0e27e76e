"""Every help text of the CLI shows whole: typer renders help through rich markup, where a `[word ...]` is a
style tag and vanishes (`repeatable [default: both].` printed as `repeatable .`)."""

from __future__ import annotations

from typing import Any

import rich.markup
import typer
from typer.testing import CliRunner

from pdlaunch.cli import app


def _helps(command: Any, path: str) -> list[tuple[str, str]]:
    found = [(f"{path} {p.name}", p.help) for p in command.params if getattr(p, "help", None)]
    found += [(f"{path} (command)", text) for text in (command.help, command.short_help) if text]
    for name, sub in getattr(command, "commands", {}).items():  # typer's vendored click: not click.Group
        found += _helps(sub, f"{path} {name}")
    return found


def test_no_help_text_loses_words_to_rich_markup() -> None:
    helps = _helps(typer.main.get_command(app), "pdlaunch")
    assert len(helps) > 100, "the walk found the commands' options"
    lost = [(where, text) for where, text in helps if rich.markup.render(text).plain != text.replace("\\[", "[")]
    assert not lost, lost


def test_the_kv_transfer_help_shows_its_defaults() -> None:
    shown = CliRunner().invoke(app, ["bench", "kv-transfer", "--help"], env={"COLUMNS": "1000"},
                               terminal_width=1000).output
    assert "repeatable (default: both)" in " ".join(shown.split()), shown
