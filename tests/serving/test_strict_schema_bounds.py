"""What a request's JSON schema may cost to resolve and close (engine/schema_refs.py, engine/strict_schema.py), and
the pointers, anchors and `$id`s it may hold: each one a clean 400 (a SchemaError naming where, or a ValueError naming
the field) or the schema served as written, never a 500, a hang or gigabytes.

- A JSON pointer's list index: "²" is a digit to str.isdigit and int() refuses it, as it refuses 5,000 digits (a
  ValueError that named nothing); "01" names index 1 and is rewritten "1".
- A root `$id` of another scheme than https ending in "#" (drafts 6 and 7 write it so) kept its fragment in the base
  of every `$anchor`: a valid `$ref` to one was a 400 "no $anchor"; under a URN `$id` no "#..." `$ref` was found.
- Every `$anchor` was keyed by a copy of its resource's URI: 4 MB of anchors under a 4 MB `$id` took 11 GiB.
- An `"#a"` may name a definition under a key of megabytes: each `$ref` rewritten as that pointer.
- A schema sent as a JSON string is parsed without the body's 64-level bound.
- Each allOf member is closed to the keys of the others: an allOf of 4,000 `{}` (16 KB) took 15 s of a server thread.
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest

from pdlaunch.engine.schema_refs import MAX_DEPTH, MAX_POINTER_GROWTH, MAX_URI_CHARS, SchemaError, root_pointers
from pdlaunch.engine.strict_schema import MAX_CLOSING_STEPS, close_objects
from pdlaunch.engine.structured_output import StructuredOutput, check


def _refused(schema: Any) -> SchemaError:
    with pytest.raises(SchemaError) as raised:
        root_pointers(schema, "guided_json")
    return raised.value


@pytest.mark.parametrize("index", ["\u00b2", "9" * 5000, "+1", "1.0"], ids=["superscript", "5000-digits", "plus",
                                                                           "fraction"])
def test_a_list_index_that_is_not_a_number_points_to_nothing(index: str) -> None:
    error = _refused({"properties": {"a": {"$ref": f"#/anyOf/{index}"}}, "anyOf": [{}, {}]})
    assert error.field == "guided_json.properties.a.$ref" and "points to nothing" in error.message, error


def test_a_list_index_with_leading_zeros_is_rewritten_as_llguidance_reads_it() -> None:
    out = root_pointers({"properties": {"a": {"$ref": "#/anyOf/01"}}, "anyOf": [{}, {"type": "integer"}]}, "f")
    assert isinstance(out, dict) and out["properties"]["a"]["$ref"] == "#/anyOf/1"


@pytest.mark.parametrize(("ref", "anchor"), [("#x", "x"), ("#a%20b", "a b"), ("#/$defs/x", "x")],
                         ids=["anchor", "percent-encoded-anchor", "pointer"])
@pytest.mark.parametrize("root_id", ["http://e.com/s.json#", "urn:example:s"], ids=["http-empty-fragment", "urn"])
def test_refs_under_a_root_id_of_another_scheme_are_found(root_id: str, ref: str, anchor: str) -> None:
    """urljoin keeps an `$id` of another scheme than its base's as written, "#" and all: every `$anchor`'s key had
    two; and it resolves no reference against a URN ("#/$defs/x" named the document "")."""
    schema = {"$id": root_id, "type": "object", "properties": {"a": {"$ref": ref}},
              "required": ["a"], "$defs": {"x": {"$anchor": anchor, "type": "integer"}}}
    out = root_pointers(schema, "f")
    assert isinstance(out, dict) and out["properties"]["a"]["$ref"] == "#/$defs/x"
    check(StructuredOutput(kind="json", value=json.dumps(schema), field="guided_json"))


@pytest.mark.parametrize(("schema", "where"), [
    ({"$id": "http://[::1", "type": "object"}, "guided_json.$id"),
    ({"properties": {"a": {"$id": "https://e.com/" + "a" * MAX_URI_CHARS}}}, "guided_json.properties.a.$id"),
    ({"$id": "https://e.com/" + "a" * (MAX_URI_CHARS // 2) + "/",
      "properties": {"a": {"$id": "b" * (MAX_URI_CHARS // 2)}}}, "guided_json.properties.a.$id"),
], ids=["not-a-uri", "long", "long-once-resolved"])
def test_an_id_is_a_uri_of_bounded_length(schema: dict[str, Any], where: str) -> None:
    assert _refused(schema).field == where


def _anchors_peak(ident: str, count: int) -> int:
    schema = {"$id": ident, "type": "object", "$defs": {f"d{i}": {"$anchor": f"a{i}"} for i in range(count)}}
    tracemalloc.start()
    try:
        root_pointers(schema, "f")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_anchors_do_not_copy_the_uri_of_their_resource() -> None:
    """20,000 anchors under an $id of 2,000 characters: as many copies of it were 40 MB more than under a short one."""
    count, long_id = 20_000, "https://e.com/" + "a" * (MAX_URI_CHARS - 100)
    short, long = _anchors_peak("https://e.com/s.json", count), _anchors_peak(long_id, count)
    assert long < short + 4 * len(long_id) * 1000, (short, long)  # a few copies, not one an anchor


def test_the_pointers_refs_become_are_bounded() -> None:
    """Each "#a" names a definition under a key of 100,000 characters: rewritten, 20 of them outgrow the bound."""
    key = "k" * (MAX_POINTER_GROWTH // 10)
    schema = {"properties": {f"p{i}": {"$ref": "#a"} for i in range(20)}, "$defs": {key: {"$anchor": "a"}}}
    error = _refused(schema)
    assert error.field is not None and error.field.endswith(".$ref") and f"{MAX_POINTER_GROWTH:,}" in error.message
    few = root_pointers({**schema, "properties": {"p": {"$ref": "#a"}}}, "f")
    assert isinstance(few, dict) and few["properties"]["p"]["$ref"] == f"#/$defs/{key}"


def test_a_schema_sent_as_a_string_nests_at_most_the_bound() -> None:
    deep = '{"items": ' * (MAX_DEPTH + 1) + "{}" + "}" * (MAX_DEPTH + 1)
    with pytest.raises(SchemaError) as raised:
        check(StructuredOutput(kind="json", value=deep, field="guided_json"))
    assert raised.value.field == "guided_json" + ".items" * (MAX_DEPTH + 1), raised.value
    assert f"deeper than {MAX_DEPTH} levels" in raised.value.message
    shallow = '{"items": ' * 20 + '{"type": "integer"}' + "}" * 20
    check(StructuredOutput(kind="json", value=shallow, field="guided_json"))


@pytest.mark.parametrize("member", [{}, True, {"properties": {"k": {}}}], ids=["empty", "true", "one-key"])
def test_closing_an_allof_of_thousands_of_members_is_refused(member: Any) -> None:
    """Each member was closed to the keys of all the others, listed again for each one: 4,000 members took 16
    million steps (15 s). Past the bound on the steps, closing stops with a ValueError naming it."""
    schema = {"type": "object", "properties": {"a": {}}, "allOf": [member] * 4000}
    with pytest.raises(ValueError, match=f"more than {MAX_CLOSING_STEPS:,} steps"):
        close_objects(schema)
    served = {"type": "object", "properties": {"a": {}}, "allOf": [{"properties": {f"k{i}": {}}} for i in range(50)]}
    closed = close_objects(served)
    assert isinstance(closed, dict) and closed["additionalProperties"] is False and len(closed["properties"]) == 51


class _Counted(str):
    """A key that counts the comparisons made with it (a list's `in` compares each element; a set's hashes)."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _Counted.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_closing_compares_each_key_a_bounded_number_of_times() -> None:
    """An object's 3,000 keys beside an allOf member naming 3,000 others, and a $ref member's `required` merged with
    its definition's: each membership test scanned a list, 9 million comparisons."""
    n = 3000
    own = {_Counted(f"o{i}"): {} for i in range(n)}
    others = {_Counted(f"m{i}"): {} for i in range(n)}
    schema = {"type": "object", "properties": own, "allOf": [{"properties": others}]}
    required = {"type": "object", "properties": {"a": {}}, "allOf": [
        {"$ref": "#/$defs/d", "required": [_Counted(f"r{i}") for i in range(n)]}],
        "$defs": {"d": {"properties": {"z": {}}, "required": [_Counted(f"q{i}") for i in range(n)]}}}
    for case in (schema, required):
        _Counted.compared = 0
        closed = close_objects(case)
        assert isinstance(closed, dict) and _Counted.compared < 20 * n, _Counted.compared
    assert len(closed["allOf"][0]["required"]) == 2 * n
