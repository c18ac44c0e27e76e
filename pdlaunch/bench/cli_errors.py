"""How a `pdlaunch bench` command reports a user's mistake: one line per problem naming the flag, exit 1, never a
traceback; Ctrl-C exits 130 saying what was left. Comma-separated flags and paths are read with the same one-line
errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from pdlaunch.errors import PdlaunchError

err_console = Console(stderr=True)
_N = TypeVar("_N", int, float)


def fail(lines: list[str]) -> typer.Exit:
    for line in lines:
        err_console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@contextmanager
def reported(interrupted: str | Callable[[], str]) -> Iterator[None]:
    """A command's errors as lines naming the flag (no traceback); Ctrl-C exits 130 saying `interrupted` (or what
    it returns, then)."""
    try:
        yield
    except KeyboardInterrupt:
        said = interrupted if isinstance(interrupted, str) else interrupted()
        err_console.print(f"interrupted: {escape(said)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None
    except ValidationError as exc:
        raise fail(_validation_lines(exc)) from None
    except PdlaunchError as exc:
        raise fail(exc.render().splitlines()) from None


def _validation_lines(exc: ValidationError) -> list[str]:
    """One line per field, named as its flag (`random_input_len` -> `--random-input-len`); an item of a list flag
    by its place as typed (`--input-lens: item 2: ...`, not pydantic's `input_lens.1`)."""
    lines = []
    for err in exc.errors():
        where = "".join(f"item {part + 1}: " if isinstance(part, int) else f"--{str(part).replace('_', '-')}: "
                        for part in err["loc"])
        lines.append(f"{where}{err['msg'].removeprefix('Value error, ')}")
    return lines


def number_list(text: str | None, flag: str, cast: type[_N], example: str) -> list[_N] | None:
    """`"2,4,8"` -> [2, 4, 8]; None stays None. A bad item fails naming `flag`, the item and the list as typed, with
    `example` (a list the flag takes, e.g. "2,4,8")."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    kind = "integers" if cast is int else "numbers"
    if not any(items):
        raise fail([f"{flag}: {text!r} is empty; give {kind} separated by commas, e.g. {example}"])
    if not all(items):  # `2,,4` or `2,4,`: a value left out, not one to drop quietly
        raise fail([f"{flag}: {text!r} has an empty item; give {kind} separated by single commas, e.g. {example}"])
    values: list[_N] = []
    for item in items:
        try:
            values.append(cast(item))
        except ValueError:
            raise fail([f"{flag}: {item!r} in {text!r} is not {'an integer' if cast is int else 'a number'}; "
                        f"give {kind} separated by commas, e.g. {example}"]) from None
    return values


def path_flag(text: str | None, flag: str, example: str) -> Path | None:
    """`text` as a path; None stays None. Path flags are typed str, not Path, because typer reads "" (`--out "$DIR"`
    with DIR unset) as the current folder, which would get the files meant for DIR: an empty value fails naming
    `flag`, with `example` (what to give instead)."""
    if text is None:
        return None
    if not text.strip():
        raise fail([f"{flag}: is empty (an unset variable?); give {example}"])
    return Path(text)
