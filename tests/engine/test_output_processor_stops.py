"""OutputProcessor's stop rules on hand-fed tokens (demo tokenizer: one byte, one token here)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer

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
