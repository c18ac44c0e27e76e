"""Strict JSON schemas: `close_objects` gives every object schema that names its keys `"additionalProperties": false`,
as OpenAI's strict mode and xgrammar's default do (a small model otherwise invents keys until max_tokens).

A definition a `$ref` names is closed as the same schema written inline would be: in `$defs` on its own (what a `$ref`
in a property or an `items` reads), and as an `allOf` / `anyOf` member of an object, where it is only part of that
object, as a copy closed to the object's keys (`_Refs.inline`). The schema's `$ref`s are pointers from its root by then
(engine/schema_refs.root_pointers), so a copy reads the same definitions wherever it sits.

Closing is bounded by what the schema costs, not by what it says: the copies of definitions add up to at most
MAX_INLINED_CHARS, and the steps (a subschema visited, a member's keys listed, a key handed down to close beside) to at
most MAX_CLOSING_STEPS; past either, a ValueError naming the bound (a 400). Each allOf member closes to the keys of
all the others, so steps grow as the square of an allOf's members: a thousand of them is past the bound.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from pydantic import JsonValue

from pdlaunch.engine.schema_refs import ONE_SCHEMA, SCHEMA_MAPS, at, pointer_path

_ITEM_LISTS = ("prefixItems", "items")
_UNIONS = ("anyOf", "oneOf")
_COMPOSITIONS = ("allOf", *_UNIONS)
# Keywords beside a `$ref` that make it one part of the object they describe (2020-12 applies both; llguidance too).
_PARTS = ("properties", *_COMPOSITIONS)
# Keywords that say nothing of the instance: a `$ref` beside them is still the whole schema.
_ANNOTATIONS = ("title", "description", "$comment", "examples", "default", "deprecated", "readOnly", "writeOnly")
# JSON text the copies of referenced definitions may add up to (a request's schema is far smaller): past it, a schema
# whose definitions refer to each other in layers (each one twice) would grow without end.
MAX_INLINED_CHARS = 1_000_000
# Steps closing one schema may take: a subschema visited, a member's keys listed, a key passed down to close beside.
# Each allOf member is closed to its siblings' keys, so a 16 KB allOf of 4,000 `{}` took 16 million steps (15 s of a
# server thread, and again on the engine's grammar thread); a real schema takes thousands, ~1 us each.
MAX_CLOSING_STEPS = 1_000_000


class _Refs:
    """The definitions one schema's `$ref`s point to, read from its root, and the copies made of them."""

    def __init__(self, root: JsonValue) -> None:
        self.root = root
        self.copied = 0  # characters of JSON copied by `inline`
        self.steps = 0  # of MAX_CLOSING_STEPS
        self._open: list[str] = []  # the $refs being copied or listed, outermost first: one met again is a cycle
        self._keys: dict[str, list[str] | None] = {}

    def spend(self, steps: int) -> None:
        self.steps += steps
        if self.steps > MAX_CLOSING_STEPS:
            raise ValueError(f"closing its objects takes more than {MAX_CLOSING_STEPS:,} steps (allOf / anyOf / oneOf "
                             "members, each closed to the keys of the others); send a smaller schema, or "
                             "structured_outputs.disable_additional_properties: false")

    def target(self, ref: JsonValue) -> JsonValue | None:
        path = pointer_path(ref[1:]) if isinstance(ref, str) and ref.startswith("#") else None
        if path is None or ref in self._open:
            return None
        try:
            return at(self.root, path)
        except KeyError:
            return None

    @contextmanager
    def following(self, ref: JsonValue) -> Iterator[None]:
        self._open.append(str(ref))
        try:
            yield
        finally:
            self._open.pop()

    def inline(self, schema: dict[str, JsonValue], anywhere: bool) -> JsonValue | None:
        """`schema` (with a `$ref`) as a copy of its definition with the keywords beside the `$ref`, or None where the
        `$ref` stays: a cycle, a `$ref` that is not a pointer, or (unless `anywhere`) a definition in `$defs`, which is
        closed on its own as this one would be."""
        ref = schema["$ref"]
        target = self.target(ref)
        path = pointer_path(str(ref)[1:]) or ()
        if target is None or (not anywhere and (not path or path[-2:-1] in (("$defs",), ("definitions",)))):
            return None
        self.copied += len(json.dumps(target))
        if self.copied > MAX_INLINED_CHARS:
            raise ValueError(f"the definitions its $refs name in allOf / anyOf / oneOf members add up to more than "
                             f"{MAX_INLINED_CHARS:,} characters once copied where they are used")
        beside = {key: value for key, value in schema.items() if key != "$ref"}
        if not isinstance(target, dict):  # true / false
            return {**beside, "allOf": [target]} if beside else target
        merged = {key: value for key, value in target.items() if key not in ("$defs", "definitions")}
        for key, value in beside.items():
            theirs = merged.get(key)
            if key not in merged or theirs == value or key in _ANNOTATIONS:
                merged[key] = value
            elif key == "required" and isinstance(value, list) and isinstance(theirs, list):
                named = {name for name in theirs if isinstance(name, str)}  # a set: both lists may be long
                merged[key] = [*theirs, *(name for name in value if not isinstance(name, str) or name not in named)]
            else:  # the same keyword both sides: both apply
                return {**beside, "allOf": [target]}
        return merged

    def keys(self, ref: JsonValue) -> list[str] | None:
        """The keys the definition `ref` names (as a composition member), None when they cannot be listed."""
        if isinstance(ref, str) and ref in self._keys:
            return self._keys[ref]
        target = self.target(ref)
        if isinstance(target, bool):
            return []  # names no key, as a true / false member inline
        if not isinstance(target, dict):
            return None
        with self.following(ref):
            found = _keys_of(target, self)
        self._keys[str(ref)] = found
        return found


def close_objects(schema: JsonValue, close_self: bool = True, beside: Sequence[str] = (),
                  members_close: bool | None = None, refs: _Refs | None = None) -> JsonValue:
    """`schema` with `"additionalProperties": false` on every object schema that declares `properties` and
    leaves `additionalProperties` out: the keys it names are all it may have. An explicit `additionalProperties`
    (true, or a schema) is kept, and `{"type": "object"}` without `properties` stays any object, and so do the members
    of an `allOf` themselves (each names only part of the keys) and an object with `unevaluatedProperties`. A schema
    that is not an object (a bare true/false) comes back unchanged.

    Beside an object's own `properties` (or allOf), its anyOf / oneOf members are parts of the same object (a
    discriminated union): `additionalProperties` sees only the `properties` next to it, so closed alone the
    object forbade its members' keys and the member its object's (a valid schema refused as unsatisfiable).
    Such an object is closed to its keys and every member's, and each member to its own and the object's
    (`beside`: named `{}` there, the object constrains them). A union that is a whole allOf member, or a whole member
    of such a union, is part of the same object too: its members close only where that object's would
    (`members_close`, default `close_self`), to their keys and the rest of the object's; closed on their own they
    forbade the keys beside them. A member given as a `$ref` (a pointer into the schema) is its definition's copy,
    closed as that member written inline; a member whose keys cannot be listed (`patternProperties`, a `$ref` to
    another document, or one in a cycle) leaves its object open."""
    if refs is None:  # the outermost call
        try:
            return close_objects(schema, close_self, beside, members_close, _Refs(schema))
        except RecursionError:  # a member's definition copied in, its members' in turn: hundreds of levels
            raise ValueError("its allOf / anyOf / oneOf members refer to definitions whose own members refer to "
                             "others in a chain too long to close (hundreds of levels); send a schema of shorter "
                             "chains") from None
    refs.spend(1 + len(beside))  # the caller built `beside` for this call
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        if any(key in schema for key in _PARTS):  # one part of this object: an allOf member like the others
            rest = {key: value for key, value in schema.items() if key != "$ref"}
            parts = rest.get("allOf")
            schema = {**rest, "allOf": [*(parts if isinstance(parts, list) else ()), {"$ref": schema["$ref"]}]}
        else:
            as_defined = close_self and not beside and members_close in (None, True)  # as its definition is closed
            copied = refs.inline(schema, anywhere=not as_defined)
            if copied is not None:
                with refs.following(schema["$ref"]):
                    return close_objects(copied, close_self, beside, members_close, refs)
    out = dict(schema)
    for key in ONE_SCHEMA:
        one = out.get(key)
        if isinstance(one, dict):
            out[key] = close_objects(one, refs=refs)
    for key in _ITEM_LISTS:
        many = out.get(key)
        if isinstance(many, list):
            out[key] = [close_objects(item, refs=refs) for item in many]
    for key in SCHEMA_MAPS:
        named = out.get(key)
        if isinstance(named, dict):
            out[key] = {name: close_objects(sub, refs=refs) for name, sub in named.items()}
    properties = out.get("properties")
    own: list[str] = list(properties) if isinstance(properties, dict) else []
    # keys it requires without declaring them (any value) are its keys too: closed without them, it was unsatisfiable
    own_keys = [*own, *_required(out, properties)]
    shared, alternatives = _member_keys(schema, ("allOf",), refs), _member_keys(schema, _UNIONS, refs)
    listed = (shared is not None and alternatives is not None
              and not {"additionalProperties", "unevaluatedProperties"} & set(out))
    closes = close_self and bool(own) and listed
    parts = out.get("allOf")
    if isinstance(parts, list):
        # a member is never closed itself; a union in it closes as this object's would, to the keys beside it
        out["allOf"] = [close_objects(item, False, [*beside, *own_keys, *(alternatives or ()),
                                                    *(_member_keys({"allOf": parts[:i] + parts[i + 1:]}, ("allOf",),
                                                                   refs) or ())], close_self and listed, refs)
                        for i, item in enumerate(parts)]
    whole = not own and "allOf" not in out  # its union's members are whole alternatives, each closed on its own
    whole_close = close_self if members_close is None else members_close
    for key in _UNIONS:
        many = out.get(key)
        if isinstance(many, list):
            out[key] = [close_objects(item, whole_close, beside, refs=refs) if whole else
                        close_objects(item, closes, [*beside, *own_keys, *(shared or ())], refs=refs) for item in many]
    if closes and isinstance(properties, dict):
        extra = [key for key in (*beside, *own_keys, *(shared or ()), *(alternatives or ())) if key not in properties]
        out["properties"] = {**properties, **{key: {} for key in extra}}
        out["additionalProperties"] = False
    return out


def _member_keys(schema: dict[str, JsonValue], compositions: Sequence[str], refs: _Refs) -> list[str] | None:
    """The keys the members of `schema`'s `compositions` name (their own members' too, and those of the definitions
    their `$ref`s name), or None when a member's cannot be listed."""
    keys: list[str] = []
    for key in compositions:
        members = schema.get(key)
        for member in members if isinstance(members, list) else ():
            refs.spend(1)
            if not isinstance(member, dict):
                continue  # true / false: names no key
            found = _keys_of(member, refs)
            if found is None:
                return None
            keys.extend(found)
    return list(dict.fromkeys(keys))  # once each: definitions met twice (in layers, twice a layer) name them 2^n times


def _keys_of(member: dict[str, JsonValue], refs: _Refs) -> list[str] | None:
    """The keys one composition member names, None when they cannot be listed: `patternProperties`, an
    `additionalProperties` other than false, or a `$ref` whose definition's cannot."""
    if "patternProperties" in member or member.get("additionalProperties", False) is not False:
        return None
    named = member.get("properties")
    nested = _member_keys(member, _COMPOSITIONS, refs)
    referred = refs.keys(member["$ref"]) if "$ref" in member else []
    if nested is None or referred is None:
        return None
    found = [*(named if isinstance(named, dict) else ()), *_required(member, named), *nested, *referred]
    refs.spend(len(found))
    return list(dict.fromkeys(found))


def _required(schema: dict[str, JsonValue], properties: JsonValue) -> list[str]:
    """The names `schema` requires that `properties` does not declare."""
    required = schema.get("required")
    declared = properties if isinstance(properties, dict) else {}
    return [name for name in (required if isinstance(required, list) else ())
            if isinstance(name, str) and name not in declared]
