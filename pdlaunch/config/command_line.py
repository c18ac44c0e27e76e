"""How a pdlaunch command line is parsed: click's parser, held to the project's rule for bad input.

- A usage error (a value a flag cannot take, an unknown flag, a missing argument) exits 1 like every other
  bad input, with click's message: it names the flag, says what is wrong, suggests the closest known flag
  and the `-h` to read. Click's own exit code for it is 2.
- A value of the wrong type (`--num-prompts x`) is shown with what to give: typer said pydantic's `Input should
  be a valid integer, unable to parse string as an integer`, without the value.
- A single-valued option given twice with different values (`--port 1 --port 2`) is refused naming both;
  click keeps the last one silently. Options meant to repeat (`--prompt`) are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import typer
from pydantic import ValidationError
from typer.core import TyperCommand, TyperGroup, TyperOption

try:  # newer typers build their commands on a copy of click of their own: its classes are the ones raised
    from typer._click.core import Context
    from typer._click.exceptions import BadParameter, UsageError
except ImportError:  # typer before that: click itself
    from click.core import Context  # type: ignore[assignment]
    from click.exceptions import BadParameter, UsageError  # type: ignore[assignment]

# pydantic's error type of a value typer could not read as the option's type -> (what it is not, what to give)
_NOT_READ = {"int_parsing": ("a valid integer", "a whole number"), "float_parsing": ("a valid number", "a number")}


@contextmanager
def _usage_errors_exit_1() -> Iterator[None]:
    try:
        yield
    except UsageError as exc:
        exc.exit_code = 1
        if isinstance(exc, BadParameter) and isinstance(exc.__cause__, ValidationError):
            exc.message = _unread(exc.__cause__, exc.param.default if exc.param is not None else None) or exc.message
        raise


def _unread(error: ValidationError, default: object) -> str | None:
    """`'x' is not a valid integer; give a whole number, e.g. 160` (the option's default as the example) for a
    value typer could not read as the option's type; None for any other error."""
    first = error.errors()[0]
    if first["type"] not in _NOT_READ:
        return None
    what, give = _NOT_READ[first["type"]]
    example = ""
    if isinstance(default, int | float) and not isinstance(default, bool):
        example = f", e.g. {int(default) if float(default).is_integer() else default}"
    return f"{first['input']!r} is not {what}; give {give}{example}"


class PdlaunchGroup(TyperGroup):
    """The root group: every usage error raised under it, in any subcommand, exits 1."""

    def make_context(self, info_name: str | None, args: list[str], parent: Context | None = None,
                     **extra: object) -> Context:
        with _usage_errors_exit_1():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Context) -> object:
        with _usage_errors_exit_1():
            return super().invoke(ctx)


def given_values(params: Sequence[object], args: Sequence[str]) -> dict[TyperOption, list[str]]:
    """What each option was given on `args`, in order: its values (`--port 1`, `--port=1`), or for an on/off
    flag the spelling typed (`--ignore-eos`, `--no-ignore-eos`). Reads the command line as click's parser
    does: an option's value is the next argument whatever it looks like, and `--` ends the options."""
    options = [p for p in params if isinstance(p, TyperOption)]
    by_name = {name: p for p in options for name in (*p.opts, *p.secondary_opts)}
    given: dict[TyperOption, list[str]] = {}
    i = 0
    while i < len(args) and args[i] != "--":
        name, equals, value = args[i].partition("=")
        option = by_name.get(name)
        i += 1
        if option is None:
            continue
        if option.is_flag or option.count:
            given.setdefault(option, []).append(name)
        elif equals:
            given.setdefault(option, []).append(value)
        else:
            given.setdefault(option, []).append(" ".join(args[i:i + option.nargs]))
            i += option.nargs
    return given


class PdlaunchCommand(TyperCommand):
    """A command that refuses a single-valued option given twice with different values."""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing:
            for option, values in given_values(self.get_params(ctx), args).items():
                if not option.multiple and not option.count and len(set(values)) > 1:
                    raise UsageError(_repeated(option, values), ctx)
        return super().parse_args(ctx, args)


def _repeated(option: TyperOption, values: list[str]) -> str:
    flag = option.opts[0]
    if option.is_flag:
        return (f"{flag} was given as {' and '.join(dict.fromkeys(values))}, which contradict each other: "
                "give one of them")
    shown = ", ".join(repr(value) for value in values)
    return (f"{flag} was given {len(values)} times, with different values ({shown}), and takes one value: "
            f"give {flag} once")


def parse_strictly(app: typer.Typer) -> None:
    """Every command of `app` and of its sub-apps parses as a PdlaunchCommand (one that names a class of its
    own keeps it)."""
    for command in app.registered_commands:
        if command.cls in (None, TyperCommand):
            command.cls = PdlaunchCommand
    for group in app.registered_groups:
        if group.typer_instance is not None:
            parse_strictly(group.typer_instance)
