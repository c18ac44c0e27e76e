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

Path = tuple[str, ...]  # JSON keys (list indexes as digits) from the schema's root


class SchemaRefError(PdlaunchError, ValueError):
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
    node = schema
    for key in path:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            raise KeyError(key)
    return node


@dataclass
class _Index:
    """Where a schema's `$id`s and anchors are, and its `$ref`s with the base URI each resolves against."""

    resources: dict[str, Path] = field(default_factory=dict)  # absolute URI without fragment -> path
    anchors: dict[str, Path] = field(default_factory=dict)  # absolute URI#name -> path
    refs: list[tuple[Path, JsonValue, str]] = field(default_factory=list)  # (path of its schema, $ref, base URI)

    def add(self, schema: JsonValue, path: Path, base: str) -> None:
        if not isinstance(schema, dict):
            return
        ident = schema.get("$id")
        if isinstance(ident, str):
            uri, name = urldefrag(urljoin(base, ident))
            if not ident.startswith("#"):  # "#name" (drafts 6 and 7) is an anchor in the resource around it
                base = uri
                self.resources.setdefault(uri, path)
            if name and not name.startswith("/"):
                self.anchors.setdefault(f"{uri}#{name}", path)
        if isinstance(schema.get("$anchor"), str):
            self.anchors.setdefault(f"{base}#{schema['$anchor']}", path)
        if "$ref" in schema:
            self.refs.append((path, schema["$ref"], base))
        for sub_path, sub in subschemas(schema):
            self.add(sub, path + sub_path, base)

    def target(self, root: JsonValue, ref: JsonValue, base: str) -> Path | str:
        """The path `ref` names in `root`, or why it names nothing."""
        if not isinstance(ref, str):
            return "must be a string (a URI reference such as \"#/$defs/name\")"
        uri, name = urldefrag(urljoin(base, ref))
        within = pointer_path(name)
        if within is None:
            found = self.anchors.get(f"{uri}#{name}")
            return found if found is not None else f"{ref!r}: no $anchor {name!r} in the schema"
        start = self.resources.get(uri)
        if start is None:
            return f"{ref!r} names a document outside the schema (other documents are not fetched)"
        path = start + within
        try:
            found_value = at(root, path)
        except KeyError:
            return f"{ref!r} points to nothing in the schema"
        if not isinstance(found_value, dict | bool):
            return f"{ref!r} points to a {type(found_value).__name__}, not a schema"
        return path


def root_pointers(schema: JsonValue, where: str, prefix: Path = ()) -> JsonValue:
    """A copy of `schema` whose every `$ref` is the pointer from its root to what it named, preceded by `prefix`
    (where the copy will sit inside a larger schema), without the `$id`s (the root's too, under a `prefix`) and
    `$anchor`s those `$ref`s no longer need. `where`: the request field the schema came from, for errors."""
    if not isinstance(schema, dict):
        return schema
    index = _Index()
    root_id = schema.get("$id")
    base = urljoin(_BASE, root_id) if isinstance(root_id, str) else _BASE
    index.resources[urldefrag(base)[0]] = index.resources[_BASE] = ()
    index.add({key: value for key, value in schema.items() if key != "$id"}, (), base)
    out = copy.deepcopy(schema)
    for path, ref, ref_base in index.refs:
        found = index.target(schema, ref, ref_base)
        if isinstance(found, str):
            raise SchemaRefError(found, field=".".join((where, *path, "$ref")))
        node = at(out, path)
        if isinstance(node, dict):  # always: indexed as a dict at this path
            node["$ref"] = pointer(prefix + found)
    for path in [*_anchored(out), *([()] if prefix else [])]:
        node = at(out, path)
        if isinstance(node, dict):
            node.pop("$id", None)
            node.pop("$anchor", None)
    return out


def _anchored(schema: JsonValue, path: Path = ()) -> Iterator[Path]:
    """The paths of the subschemas below `schema`'s root that carry an `$id` or `$anchor`."""
    for sub_path, sub in subschemas(schema):
        if isinstance(sub, dict) and ("$id" in sub or "$anchor" in sub):
            yield path + sub_path
        yield from _anchored(sub, path + sub_path)
