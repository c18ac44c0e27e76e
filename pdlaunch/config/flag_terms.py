"""A message in the terms the user typed: the config paths a flag set, written as that flag.

A problem about a flag-set value is named after the flag (flag_names.py); the paths its message and hint
mention are rewritten the same way, so a user who typed `--num-gpu-blocks` reads "lower --num-gpu-blocks to
12817", not the YAML key `cache.num_gpu_blocks` they never wrote. A problem about a value from the file keeps
the file's keys throughout: its hint may point at where a key belongs in the file.

The launcher hands the same names to the processes it starts (FLAG_NAMES_ENV, set around the run by the CLI and
inherited by every child, srun steps included), so an instance's start-up error, which the launcher prints from
the instance's log, names the flag as well. A Ray actor does not inherit it: its errors name config paths.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from pydantic import TypeAdapter, ValidationError

from pdlaunch.errors import PdlaunchError

FLAG_NAMES_ENV = "PDLAUNCH_FLAG_NAMES"  # JSON object: config path -> the flag that set it
_NAMES = TypeAdapter(dict[str, str])


def _mention(path: str) -> re.Pattern[str]:
    """`path` as a whole path: not the tail of a longer one (`x.cache.block_size`), nor the head of one
    (`cache.block_size_x`, `instances[0].count.y`), nor part of a file name; a full stop after it ends a sentence."""
    return re.compile(rf"(?<![\w.\]/-]){re.escape(path)}(?![\w\[/-]|\.\w)")


def in_flag_terms(text: str, flags: Mapping[str, str]) -> str:
    """`text` with every mention of a dotted path in `flags` (`cache.num_gpu_blocks`, `instances[0].count`) written
    as its flag. A top-level key is left as it is: `colocated` or `device` is a word of the message as often as the
    key (`every instance is colocated`)."""
    for path in sorted(flags, key=len, reverse=True):
        if "." in path or "[" in path:
            text = _mention(path).sub(_literal(flags[path]), text)
    return text


def _literal(flag: str) -> Callable[[re.Match[str]], str]:
    """re.sub's replacement that is `flag` as it is (a string replacement would read its backslashes)."""
    return lambda _: flag


def name_error(exc: PdlaunchError, flags: Mapping[str, str]) -> PdlaunchError:
    """`exc`, when its field is a flag-set path, renamed to the flag with its message and hint in flag terms (in
    place; str(exc) too, which a log line shows); else `exc` unchanged."""
    flag = flags.get(exc.field) if exc.field is not None else None
    if flag is None:
        return exc
    exc.field, exc.message = flag, in_flag_terms(exc.message, flags)
    exc.hint = in_flag_terms(exc.hint, flags) if exc.hint is not None else None
    exc.args = (exc.render(),)
    return exc


@contextmanager
def flag_names_exported(flags: Mapping[str, str]) -> Iterator[None]:
    """FLAG_NAMES_ENV holds `flags` inside the block, for the processes started there; restored after."""
    before = os.environ.get(FLAG_NAMES_ENV)
    os.environ[FLAG_NAMES_ENV] = json.dumps(dict(flags))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FLAG_NAMES_ENV, None)
        else:
            os.environ[FLAG_NAMES_ENV] = before


def flag_names_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The flag names the launcher handed this process ({} when none). Raises PdlaunchError naming the variable
    when it is not a JSON object of strings (set by hand, or cut short on the way)."""
    raw = environ.get(FLAG_NAMES_ENV)
    if raw is None:
        return {}
    try:
        return _NAMES.validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise PdlaunchError(f"is not a JSON object of config path -> flag: {first['msg']}", field=FLAG_NAMES_ENV,
                            hint="`pdlaunch serve` sets it for the processes it starts: unset it") from None
