"""OutputProcessor's stop rules on hand-fed tokens (demo tokenizer: one byte, one token here)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer

from pdlaunch.engine.detokenizer import IncrementalDetokenizer
from pdlaunch.engine.output_processor import OutputProcessor
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.request import Request
from pdlaunch.model.demo_tokenizer import EOS_TOKEN_ID, build_demo_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_demo_tokenizer()


def feed(tok: Tokenizer, params: SamplingParams, text: str) -> tuple[str, str | None, int]:
    """Append `text`'s tokens one by one until one finishes the request: (text out, finish reason, tokens taken)."""

    def decode(ids: Sequence[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool | None = None) -> str:
        return tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    processor = OutputProcessor(decode, [EOS_TOKEN_ID], max_model_len=1000)
    request = Request("r", tok.encode("Hi", add_special_tokens=False).ids, params, arrival=0)
    processor.add(request)
    out, reason = "", None
    for token_id in tok.encode(text, add_special_tokens=False).ids:
        appended = processor.append_token(request, token_id)
        out += appended.text
        reason = appended.reason
        if reason is not None:
            break
    return out, reason, len(request.output_token_ids)


def test_stop_strings_are_looked_for_after_the_first_min_tokens_tokens(tok: Tokenizer) -> None:
    """As vLLM: the text of the first min_tokens tokens is never a stop, as EOS and stop ids (held back by the
    sampler) cannot be either; min_tokens 1 with stop "\\n" used to end on a first "\\n" with empty text."""
    params = SamplingParams(max_tokens=10, min_tokens=1, stop=["\n"])
    assert feed(tok, params, "\nab\ncd") == ("\nab", "stop", 4)
    assert feed(tok, params.model_copy(update={"min_tokens": 0}), "\nab\ncd") == ("", "stop", 1)
    # a stop string that starts in those tokens' text and ends after them is one
    straddling = SamplingParams(max_tokens=10, min_tokens=2, stop=["abc"])
    assert feed(tok, straddling, "abcd") == ("", "stop", 3)
    assert feed(tok, SamplingParams(max_tokens=10, min_tokens=3, stop=["abc"]), "abcd") == ("abcd", None, 4)


def test_a_stop_string_must_end_in_the_text_of_a_token_after_min_tokens(tok: Tokenizer) -> None:
    """Each stop string is looked for where it would end in the new text (vLLM's check_stop_strings), not from a
    window sized by the longest one: a short stop lying wholly in the min_tokens text was "found" at the next
    token when a longer stop was sent beside it, cutting text a stream had already sent."""
    one = SamplingParams(max_tokens=6, min_tokens=3, stop=["ab"])
    assert feed(tok, one, "abxyzw") == ("abxyzw", "length", 6)
    assert feed(tok, one.model_copy(update={"stop": ["ab", "QQQQQ"]}), "abxyzw") == ("abxyzw", "length", 6)
    assert feed(tok, one.model_copy(update={"stop": ["QQQQQ", "ab"]}), "abxyzw") == ("abxyzw", "length", 6)
    # one that starts in that text and ends after it still stops it, whatever else is sent
    assert feed(tok, one.model_copy(update={"stop": ["xy", "QQQQQ"]}), "abxyzw") == ("ab", "stop", 4)


def test_stop_strings_found_in_the_same_new_text_are_taken_in_the_requests_order() -> None:
    """As vLLM's check_stop_strings: when several stop strings end in one token's text, the first in the request's
    list wins, not the one that starts earliest. Streams stay consistent either way: text is only handed out up to
    the start of the longest tail that could begin a stop string, so no stop that ends in later text starts in
    text already sent."""
    pieces = {1: "x", 2: "abc"}
    for stop, expected, reason in ((["bc", "a"], "xa", "bc"), (["a", "bc"], "x", "a")):
        detok = IncrementalDetokenizer(lambda ids: "".join(pieces[i] for i in ids), (), stop)
        assert detok.add(1) + detok.add(2) + detok.finish() == expected
        assert (detok.text, detok.stop_str) == (expected, reason)
