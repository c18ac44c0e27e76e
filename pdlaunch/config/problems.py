"""A config problem: the field path it is about and a message that says how to fix it."""

from __future__ import annotations

from typing import NamedTuple


class Problem(NamedTuple):
    """`field` is a dotted config path (`cache.block_size`, `instances[1].count`), or `config` for the file.

    A plain (field, message) tuple, so a list of them is what `ConfigError(problems)` takes.
    """

    field: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


def problem(field: str, what: str, hint: str) -> Problem:
    """What is wrong, then how to fix it, in one line."""
    return Problem(field, f"{what}; {hint}")


def with_article(noun: str) -> str:
    """`noun` after its indefinite article, chosen by its first letter: "a list", "an int"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"
