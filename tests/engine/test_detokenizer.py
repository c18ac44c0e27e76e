"""Incremental detokenizer: multi-byte characters, stop strings, hold-back while streaming."""

from __future__ import annotations

import pytest

from pdlaunch.engine.detokenizer import IncrementalDetokenizer
from pdlaunch.model.demo_tokenizer import build_demo_tokenizer


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return build_demo_tokenizer()


def decode_fn(tok):  # type: ignore[no-untyped-def]
    return lambda ids: tok.decode(list(ids), skip_special_tokens=True)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = []
    for t in ids:
        pieces.append(detok.add(t))
        if detok.stopped:
            break
    pieces.append(detok.finish())
    return pieces


def test_multibyte_characters_are_never_split(tok) -> None:  # type: ignore[no-untyped-def]
    text = " naïve café — 你好世界 🚀🎉 done"
    prompt = tok.encode("Hello").ids
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # multi-byte chars really span several byte tokens
    detok = IncrementalDetokenizer(decode_fn(tok), prompt)
    pieces = stream(detok, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert detok.text == text


def test_incomplete_character_is_flushed_at_finish(tok) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode("ok 🚀", add_special_tokens=False).ids
    detok = IncrementalDetokenizer(decode_fn(tok))
    out = "".join(detok.add(t) for t in ids[:-1])
    assert "\ufffd" not in out
    assert out + detok.finish() == tok.decode(ids[:-1])


def test_stop_string_cuts_the_text_and_finishes(tok) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode(" The capital of France is Paris. What", add_special_tokens=False).ids
    detok = IncrementalDetokenizer(decode_fn(tok), stop=["Paris"])
    pieces = stream(detok, ids)
    assert detok.stopped
    assert "".join(pieces) == " The capital of France is "
    assert detok.text == " The capital of France is "


def test_partial_stop_match_is_held_back_then_released(tok) -> None:  # type: ignore[no-untyped-def]
    detok = IncrementalDetokenizer(decode_fn(tok), stop=["abcX"])
    emitted = []
    for ch in "xyabcd":
        emitted.append(detok.add(tok.encode(ch, add_special_tokens=False).ids[0]))
    # "ab", "abc" could start the stop string: held back until "d" shows it does not.
    assert emitted == ["x", "y", "", "", "", "abcd"]
    assert not detok.stopped


def test_held_back_tail_is_released_when_the_request_ends(tok) -> None:  # type: ignore[no-untyped-def]
    detok = IncrementalDetokenizer(decode_fn(tok), stop=["the end"])
    ids = tok.encode("see the e", add_special_tokens=False).ids
    out = "".join(detok.add(t) for t in ids)
    assert out == "see "
    assert detok.finish() == "the e"
    assert detok.text == "see the e"


def test_stop_string_spanning_tokens(tok) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode("hello world, again", add_special_tokens=False).ids
    detok = IncrementalDetokenizer(decode_fn(tok), stop=["o w", "zzz"])
    assert "".join(stream(detok, ids)) == "hell"


def _held_back_by_definition(text: str, stops: list[str]) -> int:
    """The longest tail of `text`, shorter than the longest stop string, that is a prefix of a stop string."""
    longest = max(len(s) for s in stops)
    return max((n for n in range(1, min(len(text), longest - 1) + 1) for s in stops if s.startswith(text[-n:])),
               default=0)


def test_the_held_back_tail_is_the_longest_stop_prefix_after_every_token() -> None:
    """The search for the held-back tail starts from the last one plus the new characters (a tail that is a stop
    prefix now was one, less those characters, before); on random pieces over a two-letter alphabet, where partial
    matches grow, break and regrow, every release holds back exactly the longest tail that could still become a
    stop string."""
    import random

    rng = random.Random(5)
    for trial in range(200):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]
        pieces = {i: "".join(rng.choice("ab") for _ in range(rng.randint(1, 3))) for i in range(1, 40)}
        detok = IncrementalDetokenizer(lambda ids: "".join(pieces[i] for i in ids), (), stops)
        detok.check_stop = False  # no stop ends it: only the held-back tail is under test
        for _ in range(30):
            detok.add(rng.randint(1, 39))
            held = len(detok.decoded) - detok.emitted
            assert held == _held_back_by_definition(detok.decoded, stops), (trial, stops, detok.decoded, held)
