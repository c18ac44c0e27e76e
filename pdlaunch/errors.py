"""The one domain error type. The CLI turns it into a readable message and exit code 1."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn, TypeVar

T = TypeVar("T")


class PdlaunchError(Exception):
    """A user-facing error. `field` is the config path or flag it is about (e.g. `cache.block_size`)."""

    def __init__(self, message: str, field: str | None = None, hint: str | None = None) -> None:
        self.field = field
        self.message = message
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.field}: {self.message}" if self.field else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class ConfigError(PdlaunchError):
    """A deployment config problem; may carry several problems at once."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        field, message = problems[0] if problems else ("", "invalid configuration")
        super().__init__(message if len(problems) == 1 else f"{len(problems)} problems", field=field or None)

    def render(self) -> str:
        return "\n".join(f"{f}: {m}" if f else m for f, m in getattr(self, "problems", [])) or super().render()


class EngineError(PdlaunchError):
    """A problem in the engine that a request can be failed with (HTTP 4xx/5xx once served)."""


class KVTransferError(PdlaunchError):
    """A KV transfer failure: handshake, engine_id mismatch, incompatibility, timeout, checksum."""


_JSON_KINDS: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object",
                                list: "list", type(None): "null"}


def json_kind(value: object) -> str:
    """What a JSON value is, for an error: `an integer`, `a list of integers and strings`."""
    if isinstance(value, list):
        kinds = sorted({_JSON_KINDS.get(type(v), "value") for v in value})
        return f"a list of {' and '.join(k + 's' for k in kinds)}" if kinds else "an empty list"
    kind = _JSON_KINDS.get(type(value), "value")
    return kind if kind == "null" else ("an " if kind[0] in "aeiou" else "a ") + kind


def error_text(error: Mapping[str, object]) -> str:
    """A pydantic error's message as a user reads it: our validators' own words, without the "Value error, "
    pydantic puts before the text of a ValueError."""
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def exit_text(code: int | None) -> str:
    """How a process ended, from its exit status as subprocess and multiprocessing report it (-N: signal N):
    "exited with code 1", "was killed by signal 9 (SIGKILL)", "was killed by signal 99" (a number with no
    name here); None (it has not ended, or is not reaped yet): "is running"."""
    if code is None:
        return "is running"
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    except ValueError:
        return f"was killed by signal {-code}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the `python -m pdlaunch....` entry points, with the CLI's exit status for a usage error: 1
    (argparse's own is 2), and the error on one line that names the flag, not after the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def argument_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """`parse` as an argparse `type`: its PdlaunchError becomes the usage error of the argument (one line naming
    the flag and the field, exit code 1 with ArgumentParser), not a traceback."""
    def parsed(text: str) -> T:
        try:
            return parse(text)
        except PdlaunchError as exc:
            raise argparse.ArgumentTypeError(exc.render()) from None

    return parsed
