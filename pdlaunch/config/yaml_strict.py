"""Reading a deployment YAML file: duplicate keys refused (PyYAML keeps the last of two equal keys
without a word, so a file that sets `port` twice would silently run on the second value), a value
that is not what its tag says (`!!int abc`, `!!bool maybe`, a date with month 13) or an integer too
long to print refused by its key path, and every other failure reported as a problem naming the
file, line and column. A path that is no regular file (a FIFO would hold the read forever) or a file
past MAX_CONFIG_BYTES (parsed whole, 60 MB took two minutes) is refused before any read.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import yaml

from pdlaunch.config.problems import Problem, problem, with_article
from pdlaunch.errors import ConfigError

# A deployment config is a few KiB (an inline chat template adds a few more); parsing is ~2 s a MiB on one core.
MAX_CONFIG_BYTES = 1 << 20
_NOT_FILES = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
_MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *defaults` may be overridden by explicit keys
# Python refuses to print an int of more than 4300 digits (sys.get_int_max_str_digits), and no setting takes one.
_MAX_INT_BITS = 4000 * 332 // 100  # 4000 digits
_KINDS = {"int": "an integer", "float": "a number", "bool": "a boolean (true/false, yes/no, on/off)",
          "timestamp": "a date", "binary": "base64 bytes"}


# A YAML `"\\ud83d"` escape yields a UTF-16 surrogate code point, which no file, log line or terminal can hold.
_SURROGATES = re.compile("[\ud800-\udfff]")


def _joined_surrogates(text: str) -> str | None:
    """`text` with each surrogate pair (JSON's `"\\ud83d\\ude00"` for U+1F600, which PyYAML reads as two code
    points) joined into its character; None when a lone surrogate is left."""
    try:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        return None


class UnreadableValue(Exception):
    """A scalar that its YAML tag cannot turn into a value: `problem` names its key path and line."""

    def __init__(self, found: Problem) -> None:
        super().__init__(found.message)
        self.problem = found


class StrictLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no types: its classes are untyped
    """SafeLoader that, before constructing, reports every key that appears twice in one mapping."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self.paths: dict[int, str] = {}  # id(node) -> its key path, filled by duplicate_keys

    def construct_object(self, node: yaml.Node, deep: bool = False) -> object:
        try:
            data = super().construct_object(node, deep)
        except (ValueError, KeyError, OverflowError) as exc:  # PyYAML's constructors raise these for `!!int abc`
            raise UnreadableValue(self._unreadable(node, exc)) from None
        if isinstance(data, int) and data.bit_length() > _MAX_INT_BITS:  # `0xfff...`: hex is not length-limited
            raise UnreadableValue(self._unreadable(node, None))
        if isinstance(data, str) and _SURROGATES.search(data):
            joined = _joined_surrogates(data)
            if joined is None:
                raise UnreadableValue(self._lone_surrogate(node, data))
            return joined
        return data

    def _lone_surrogate(self, node: yaml.Node, text: str) -> Problem:
        where = f"in {self.source} at line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"
        shown = repr(text if len(text) <= 40 else text[:37] + "...")
        return problem(self.paths.get(id(node), "config"), f"{shown} {where} holds a lone UTF-16 surrogate escape, "
                       "which is no character", "write the character itself, or its \\U00XXXXXX escape (a JSON "
                       "pair of \\uXXXX escapes, high then low, reads as the one character)")

    def _unreadable(self, node: yaml.Node, exc: Exception | None) -> Problem:
        where = f"in {self.source} at line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"
        path = self.paths.get(id(node), "config")
        text = str(node.value)
        shown = repr(text if len(text) <= 40 else text[:37] + "...")
        if exc is None or (node.tag.endswith(":int") and len(text) > 4000):
            return problem(path, f"the integer {shown} {where} has more than 4000 digits",
                           "give a value in the setting's range")
        kind = _KINDS.get(node.tag.rsplit(":", 1)[-1], node.tag)
        reason = "" if isinstance(exc, KeyError) else f" ({str(exc).split('; use sys.')[0]})"
        return problem(path, f"{shown} {where} is not {kind}{reason}",
                       "write a value of that kind, or drop the tag and quote it to make it a string")

    def duplicate_keys(self, node: yaml.Node, path: str, seen: set[int]) -> list[Problem]:
        if id(node) in seen:  # an alias to a node already walked (or a recursive anchor)
            return []
        seen.add(id(node))
        self.paths[id(node)] = path or "config"
        problems: list[Problem] = []
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                problems += self.duplicate_keys(item, f"{path}[{i}]", seen)
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = str(key_node.value)
                child = f"{path}.{key}" if path else key
                line = key_node.start_mark.line + 1
                if key in first_line:
                    problems.append(problem(child, f"duplicate key `{key}` in {self.source} at line {line} "
                                            "(first at line "
                                            f"{first_line[key]}); YAML would silently keep only the last one",
                                            "keep one of the two"))
                else:
                    first_line[key] = line
                problems += self.duplicate_keys(value_node, child, seen)
        return problems


def load_strict(text: str, source: str) -> tuple[object, list[Problem]]:
    """The document, and a problem for every duplicate key (named by its dotted path and line); a value
    its tag cannot read is a problem too, and the document then None.

    Raises yaml.YAMLError for a syntax error, as yaml.safe_load does.
    """
    loader = StrictLoader(text, source)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        problems = loader.duplicate_keys(node, "", set())
        try:
            return loader.construct_document(node), problems
        except UnreadableValue as exc:
            return None, [*problems, exc.problem]
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, object]:
    """The file's top-level mapping ({} for an empty file). Raises ConfigError naming file/line/column."""
    try:
        # os.path.expanduser leaves `~nosuchuser` as is (Path.expanduser raises RuntimeError).
        text = _read_text(Path(os.path.expanduser(str(path))), path)
    except FileNotFoundError:
        raise ConfigError([problem("config", f"file {str(path)!r} does not exist", "check the path")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        unreadable = problem("config", f"cannot read {str(path)!r}: {exc}", "pass a readable UTF-8 file")
        raise ConfigError([unreadable]) from None
    try:
        data, duplicates = load_strict(text, repr(str(path)))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([problem("config", f"YAML syntax error in {str(path)!r}{where}: {what}",
                                   "fix the YAML there (indentation, ':' after keys, quotes)")]) from None
    except RecursionError:
        raise ConfigError([problem("config", f"{str(path)!r} nests too deeply", "flatten the document")]) from None
    if duplicates:
        raise ConfigError(duplicates)
    if data is None:
        return {}
    if not isinstance(data, dict):
        what = f"{str(path)!r} holds {with_article(type(data).__name__)}, not a mapping of keys"
        raise ConfigError([problem("config", what, "write `key: value` lines, e.g. `model: {path: demo}`")])
    return data


def _read_text(file: Path, path: Path) -> str:
    """The file's text; a ConfigError naming `path` (as the user typed it) when it is no regular file (a FIFO would
    block the read until a writer came) or larger than MAX_CONFIG_BYTES. OSError / UnicodeDecodeError as read."""
    info = file.stat()
    kind = next((name for is_kind, name in _NOT_FILES if is_kind(info.st_mode)), None)
    if kind is not None:
        raise ConfigError([problem("config", f"{str(path)!r} is {kind}, not a regular file",
                                   "pass the YAML file itself (write a pipe's output to a file first)")])
    with file.open("rb") as f:  # a directory raises IsADirectoryError here, read as any OSError
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        size = max(info.st_size, len(data)) / (1 << 20)
        raise ConfigError([problem("config", f"{str(path)!r} is {size:.1f} MiB; a deployment config is a few KiB "
                                   f"and at most {MAX_CONFIG_BYTES >> 20} MiB here",
                                   "check that this is the config file you meant")])
    return data.decode("utf-8")
