"""The `$ref`s of a JSON schema a request sends: each resolved in the schema itself, rewritten as a pointer from its
root, and named where it is when it points nowhere.

llguidance resolves a `$ref` as it compiles the grammar (a JSON pointer, an `$anchor`, the URI of a subschema's
`$id`); one it could not resolve failed the request with "Pointer '/$defs/x' does not exist", naming the request field
but not where in the schema the `$ref` was. Strict mode (engine/strict_schema.py) reads the definitions an `allOf` /
`anyOf` member refers to, to close them as it closes inline members, so every `$ref` is resolved once, here
(`root_pointers`), into the pointer from the schema's root (`#/$defs/x`) that both read alike; the `$id`s and
`$anchor`s below the root go, nothing refers by them any more (a copy of a definition may then sit anywhere). A
`$ref` that names nothing in the schema (a typo, another document: nothing is fetched) is a SchemaRefError naming
its path, `response_format.json_schema.schema.properties.a.$ref`.

The schema is the client's: what it costs here is bounded by what it sent. It nests at most MAX_DEPTH levels (a
schema sent as a JSON string is parsed without the request body's bound), an `$id` resolves to at most
MAX_URI_CHARS characters (every `$anchor` and `$ref` below it was a copy of it: 4 MB of anchors under a long `$id`
took 11 GiB), and the pointers the `$ref`s become may outgrow what the request wrote by MAX_POINTER_GROWTH characters
(an `"#a"` names a definition whose key may be megabytes long). Past a bound, and where an `$id` or `$ref` is not a
URI reference or a pointer's list index is not a number, the schema is a SchemaError naming the field: a 400.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urldefrag, urljoin

from pydantic import JsonValue

from pdlaunch.errors import PdlaunchError

# Keywords whose value is one subschema, a list of them, or a map of name -> subschema (JSON Schema 2020-12, draft 7's
# `definitions`, `dependencies` and list `items`); `const`, `enum`, `default` and `examples` hold values, never schemas.
ONE_SCHEMA = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
              "unevaluatedProperties", "unevaluatedItems", "additionalItems", "contentSchema")
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
# The base URI of a schema without an `$id` (never fetched; relative `$ref`s and `$id`s resolve against it).
_BASE = "https://pdlaunch.invalid/schema.json"

MAX_DEPTH = 64  # JSON levels, the request body's own bound (pdlaunch.http.limits.MAX_JSON_DEPTH)
MAX_URI_CHARS = 2048
MAX_POINTER_GROWTH = 1_000_000  # characters; a tool's prefix adds ~40 a $ref

Path = tuple[str, ...]  # JSON keys (list indexes as digits) from the schema's root


class SchemaError(PdlaunchError, ValueError):
    """A request's JSON schema that cannot be used; `field` is the path from the request's body to what is wrong."""


class SchemaRefError(SchemaError):
    """A `$ref` that names nothing in its schema; `field` is its path from the request's body."""


def subschemas(schema: JsonValue) -> Iterator[tuple[Path, JsonValue]]:
    """(relative path, subschema) of each schema `schema`'s keywords hold (not their own subschemas)."""
    if not isinstance(schema, dict):
        return
    for key in ONE_SCHEMA:
        if isinstance(schema.get(key), dict | bool):
            yield (key,), schema[key]
    for key in SCHEMA_LISTS:
        many = schema.get(key)
        for i, item in enumerate(many if isinstance(many, list) else ()):
            yield (key, str(i)), item
    for key in SCHEMA_MAPS:
        named = schema.get(key)
        for name, item in (named.items() if isinstance(named, dict) else ()):
            if isinstance(item, dict | bool):  # draft 7 `dependencies` also maps names to lists of names
                yield (key, name), item


def pointer(path: Path) -> str:
    """The URI fragment of the JSON pointer to `path` (`#/$defs/a~1b` for ("$defs", "a/b"))."""
    return "#" + "".join("/" + quote(key.replace("~", "~0").replace("/", "~1"), safe="!$&'()*+,;=:@") for key in path)


def pointer_path(fragment: str) -> Path | None:
    """The path a JSON pointer fragment names (`/$defs/a~1b` -> ("$defs", "a/b")), None when it is not a pointer
    (an anchor's name)."""
    if fragment and not fragment.startswith("/"):
        return None
    return tuple(unquote(key).replace("~1", "/").replace("~0", "~") for key in fragment.split("/")[1:])


def at(schema: JsonValue, path: Path) -> JsonValue:
    """The value at `path` in `schema`; KeyError when nothing is there."""
    return walk(schema, path)[1]


def walk(schema: JsonValue, path: Path) -> tuple[Path, JsonValue]:
    """(`path` with its list indexes written as llguidance reads them, the value there); KeyError when nothing is
    there. A pointer may write index 1 as "01": rewritten, it says "1". "+1" names nothing (RFC 6901 indexes are
    digits), though llguidance would read it as 1."""
    node, canonical = schema, []
    for key in path:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and (i := _index(key, len(node))) is not None:
            node, key = node[i], str(i)
        else:
            raise KeyError(key)
        canonical.append(key)
    return tuple(canonical), node


def _index(key: str, size: int) -> int | None:
    """The list index `key` names in a list of `size` items, None when it names none ("²" is a digit to isdigit, and
    int() refuses more than 4,300 digits)."""
    if not (key.isascii() and key.isdigit()):
        return None
    digits = key.lstrip("0") or "0"
    if len(digits) > len(str(size)):
        return None
    return int(digits) if int(digits) < size else None


def _join(base: str, ref: str) -> str | None:
    """`ref` resolved against `base`, None when it is not a URI reference (urllib refuses "http://[::1")."""
    try:
        return urljoin(base, ref)
    except ValueError:
        return None


def check_depth(schema: JsonValue, where: str) -> None:
    """SchemaError naming the first object or list in `schema` more than MAX_DEPTH levels below its root. Iterative,
    one iterator a level: no recursion, and no path kept for each of a million siblings."""
    path: list[str] = []
    pending: list[Iterator[tuple[str, JsonValue]]] = [_children(schema)]
    while pending:
        step = next(pending[-1], None)
        if step is None:
            pending.pop()
            if path:
                path.pop()
            continue
        key, value = step
        if isinstance(value, dict | list):
            path.append(key)
            if len(path) > MAX_DEPTH:
                raise SchemaError(f"the schema nests deeper than {MAX_DEPTH} levels", field=".".join((where, *path)))
            pending.append(_children(value))


def _children(value: JsonValue) -> Iterator[tuple[str, JsonValue]]:
    if isinstance(value, dict):
        return iter(value.items())
    if isinstance(value, list):
        return ((str(i), item) for i, item in enumerate(value))
    return iter(())


@dataclass
class _Index:
    """Where a schema's `$id`s and anchors are, its `$ref`s with the base URI each resolves against, and the
    subschemas below its root that carry an `$id` or `$anchor`. Objects of the schema are kept, not their paths
    walked again: a million `$ref`s 30 levels down cost 30 million steps more."""

    where: str  # the request field the schema came from
    resources: dict[str, Path] = field(default_factory=dict)  # absolute URI without fragment -> path
    # (absolute URI without fragment, name) -> path: a pair, not one string, so that no anchor copies its URI
    anchors: dict[tuple[str, str], Path] = field(default_factory=dict)
    refs: list[tuple[Path, dict[str, JsonValue], str]] = field(default_factory=list)  # (path, its schema, base URI)
    anchored: list[dict[str, JsonValue]] = field(default_factory=list)

    def base_of(self, ident: str, base: str, path: Path) -> tuple[str, str]:
        """(absolute URI without fragment, fragment) of the `$id` `ident` at `path`, SchemaError when it is not a URI
        reference or resolves to more than MAX_URI_CHARS characters."""
        joined = _join(base, ident)
        if joined is None or len(joined) > MAX_URI_CHARS:
            why = "is not a URI reference" if joined is None else f"resolves to more than {MAX_URI_CHARS:,} characters"
            raise SchemaError(f"$id {ident[:100]!r} {why}", field=".".join((self.where, *path, "$id")))
        uri, name = urldefrag(joined)
        return uri, name

    def add(self, schema: JsonValue, path: Path, base: str) -> None:
        """Index `schema` at `path` (the root: its `$id` is the caller's) and the subschemas below it."""
        if not isinstance(schema, dict):
            return
        ident = schema.get("$id") if path else None
        if isinstance(ident, str):
            uri, name = self.base_of(ident, base, path)
            if not ident.startswith("#"):  # "#name" (drafts 6 and 7) is an anchor in the resource around it
                base = uri
                self.resources.setdefault(uri, path)
            if name and not name.startswith("/"):
                self.anchors.setdefault((uri, unquote(name)), path)
        anchor = schema.get("$anchor")
        if isinstance(anchor, str):
            self.anchors.setdefault((base, anchor), path)
        if path and ("$id" in schema or "$anchor" in schema):
            self.anchored.append(schema)
        if "$ref" in schema:
            self.refs.append((path, schema, base))
        for sub_path, sub in subschemas(schema):
            self.add(sub, path + sub_path, base)

    def target(self, root: JsonValue, ref: JsonValue, base: str) -> Path | str:
        """The path `ref` names in `root`, or why it names nothing."""
        if not isinstance(ref, str):
            return "must be a string (a URI reference such as \"#/$defs/name\")"
        if ref.startswith("#"):  # the usual $ref, in the document of its base: no copy of that URI
            uri, name = base, ref[1:]
        else:
            joined = _join(base, ref)
            if joined is None:
                return f"{ref[:100]!r} is not a URI reference"
            uri, name = urldefrag(joined)
        within = pointer_path(name)
        if within is None:  # an anchor's name, percent-decoded as a pointer's keys are
            found = self.anchors.get((uri, unquote(name)))
            return found if found is not None else f"{ref!r}: no $anchor {name!r} in the schema"
        start = self.resources.get(uri)
        if start is None:
            return f"{ref!r} names a document outside the schema (other documents are not fetched)"
        try:
            path, found_value = walk(root, start + within)
        except KeyError:
            return f"{ref!r} points to nothing in the schema"
        if not isinstance(found_value, dict | bool):
            return f"{ref!r} points to a {type(found_value).__name__}, not a schema"
        return path


def root_pointers(schema: JsonValue, where: str, prefix: Path = ()) -> JsonValue:
    """A copy of `schema` whose every `$ref` is the pointer from its root to what it named, preceded by `prefix`
    (where the copy will sit inside a larger schema), without the `$id`s (the root's too, under a `prefix`) and
    `$anchor`s those `$ref`s no longer need. `where`: the request field the schema came from, for errors."""
    check_depth(schema, where)
    if not isinstance(schema, dict):
        return schema
    out = copy.deepcopy(schema)
    index = _Index(where)
    root_id = out.get("$id")
    # without its fragment: an `$id` of "https://e.com/s.json#" (drafts 6 and 7 write it so) is that document
    base = index.base_of(root_id, _BASE, ())[0] if isinstance(root_id, str) else _BASE
    index.resources[base] = index.resources[_BASE] = ()
    index.add(out, (), base)
    rewritten: list[tuple[dict[str, JsonValue], str]] = []
    grown = 0
    for path, node, ref_base in index.refs:  # every target found in the schema as sent, then every $ref rewritten
        ref = node["$ref"]
        found = index.target(out, ref, ref_base)
        if isinstance(found, str):
            raise SchemaRefError(found, field=".".join((where, *path, "$ref")))
        rewritten.append((node, pointer(prefix + found)))
        grown += max(0, len(rewritten[-1][1]) - len(str(ref)))
        if grown > MAX_POINTER_GROWTH:
            raise SchemaError(f"the pointers its $refs name add up to more than {MAX_POINTER_GROWTH:,} characters "
                              "beyond the $refs written", field=".".join((where, *path, "$ref")))
    for node, ref in rewritten:
        node["$ref"] = ref
    for node in [*index.anchored, *([out] if prefix else [])]:
        node.pop("$id", None)
        node.pop("$anchor", None)
    return out
