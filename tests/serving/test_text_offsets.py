"""Completions' logprobs `text_offset` is each token's character offset in the text the choice returns, also where
tokens split a multi-byte UTF-8 character (the tiny model's byte-level tokenizer writes "é" as two byte tokens,
each U+FFFD when decoded alone): both tokens of such a character begin where it does. The offsets summed each
token's own text before, so every token after the first split character pointed past its place in the text; and a
stream's offsets (counted from the text sent) disagreed with the same request's whole answer. Through a real
instance (tiny model, CPU, in this process)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer as HFTokenizer

from pdlaunch.http.sse import parse_sse
from pdlaunch.model.demo import resolve_model_path
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.server.text_offsets import TextOffsets
from tests.serving.helpers import in_process_instance, tiny_colocated

TIMEOUT = 120.0  # a loaded 2-core machine
PROMPT = "café € naïve"  # 2-, 3- and 2-byte characters


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(tiny_colocated(256), "text-offsets-0") as (address, _):
        yield address


def _char_starts(text: str) -> list[int]:
    """Each token's offset as the tokenizer's own encoding maps it: the start of the character its bytes are of."""
    encoding = HFTokenizer.from_file(str(resolve_model_path("tiny") / "tokenizer.json")).encode(text)
    return [start for start, _ in encoding.offsets]


def test_offsets_count_the_characters_before_each_token() -> None:
    tokenizer = Tokenizer(resolve_model_path("tiny"))
    ids = tokenizer.encode(PROMPT)
    assert len(ids) > len(PROMPT)  # the characters are split across tokens: the case under test
    assert TextOffsets(tokenizer.decode).of(ids) == _char_starts(PROMPT)
    # in parts, as a stream asks, and after a start (an echoed prompt's characters)
    offsets = TextOffsets(tokenizer.decode, start=7)
    assert offsets.of(ids[:5]) + offsets.of(ids[5:]) == [7 + o for o in _char_starts(PROMPT)]


@pytest.mark.parametrize("skip_special_tokens", [True, False], ids=["skip-special", "keep-special"])
@pytest.mark.parametrize("max_tokens", [0, 1])
def test_an_echoed_prompt_s_offsets_index_its_text(url: str, max_tokens: int, skip_special_tokens: bool) -> None:
    """The prompt's BOS, added by the tokenizer, is no text of the echoed prompt: it begins at 0 and the prompt's
    first character there too, whether the output keeps special tokens or not (with `skip_special_tokens: false` the
    echoed tokens were counted in a text holding the BOS's, so "c" began at 17 in a text of 12 characters)."""
    answer = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={
        "model": "tiny", "prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": max_tokens,
        "temperature": 0.0, "skip_special_tokens": skip_special_tokens})
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["text"].startswith(PROMPT)
    offsets = choice["logprobs"]["text_offset"]
    assert offsets[:len(_char_starts(PROMPT))] == _char_starts(PROMPT), choice["logprobs"]
    if max_tokens:  # the generated token begins after the prompt
        assert offsets[-1] == len(PROMPT), choice["logprobs"]


@pytest.mark.parametrize("skip_special_tokens", [True, False], ids=["skip-special", "keep-special"])
@pytest.mark.parametrize("sent", ["token-ids", "bos-text"])
def test_an_echoed_prompt_s_offsets_index_the_echoed_text(url: str, sent: str, skip_special_tokens: bool) -> None:
    """A prompt of token ids is echoed as their text, without the BOS's; a prompt that writes the BOS's text itself
    is echoed as written, the BOS's text first. Either way each echoed token begins where its text does in the
    echoed prompt."""
    tokenizer = Tokenizer(resolve_model_path("tiny"))
    assert tokenizer.bos_token is not None
    ids = tokenizer.encode(PROMPT)
    prompt: str | list[int] = ids if sent == "token-ids" else tokenizer.bos_token + PROMPT
    answer = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={
        "model": "tiny", "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 1, "temperature": 0.0,
        "skip_special_tokens": skip_special_tokens})
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    echoed = PROMPT if sent == "token-ids" else tokenizer.bos_token + PROMPT
    # the tokenizer's own offsets; the text that writes the BOS is encoded with that one BOS, not a second
    expected = _char_starts(PROMPT) if sent == "token-ids" else _char_starts(echoed)[1:]
    assert choice["text"].startswith(echoed), choice
    offsets = choice["logprobs"]["text_offset"]
    assert offsets == [*expected, len(echoed)], choice["logprobs"]


@pytest.mark.parametrize("max_tokens", [0, 1])
@pytest.mark.parametrize("prompt", ["", "bos-id"])
def test_an_echoed_prompt_without_text_leads_the_logprobs(url: str, prompt: str, max_tokens: int) -> None:
    """A prompt whose tokens have no text (the empty string, encoded as the BOS; a BOS sent as its id) is echoed as
    any other: its tokens lead the logprobs, the first without a logprob. They were left out (an empty echoed text
    read as no echo), so `max_tokens: 0` answered no token at all for a prompt of one."""
    tokenizer = Tokenizer(resolve_model_path("tiny"))
    assert tokenizer.bos_token is not None and tokenizer.bos_token_id is not None
    sent: str | list[int] = "" if prompt == "" else [tokenizer.bos_token_id]
    answer = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={
        "model": "tiny", "prompt": sent, "echo": True, "logprobs": 1, "max_tokens": max_tokens, "temperature": 0.0})
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert answer.json()["usage"]["prompt_tokens"] == 1
    assert logprobs["tokens"][0] == tokenizer.bos_token and logprobs["token_logprobs"][0] is None, logprobs
    assert len(logprobs["tokens"]) == 1 + max_tokens and logprobs["text_offset"] == [0] * (1 + max_tokens), logprobs


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The demo tokenizer's ids below 256 are the bytes; its merges are ASCII; its specials read as nothing."""
    return bytes([token_id]) if token_id < 256 else tokenizer.decode([token_id]).encode()


def _logprobs(url: str, stream: bool) -> tuple[str, list[int], list[int]]:
    """(text, output token ids, text_offset) of a sampled request, a stream's chunks folded into one."""
    answer = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={
        "model": "tiny", "prompt": "Tell me about a place", "max_tokens": 40, "temperature": 5.0, "seed": 11,
        "ignore_eos": True, "logprobs": 0, "return_token_ids": True, "stream": stream})
    assert answer.status_code == 200, answer.text
    choices: list[dict[str, Any]] = [answer.json()["choices"][0]] if not stream else [
        c for event in parse_sse(answer.content)[:-1] for c in json.loads(event)["choices"]]
    return ("".join(c["text"] for c in choices), [i for c in choices for i in c["token_ids"]],
            [o for c in choices for o in (c["logprobs"] or {}).get("text_offset", [])])


def test_sampled_offsets_index_the_text_streamed_or_whole(url: str) -> None:
    """Temperature 5 samples byte tokens of characters split across tokens and of bytes that are none (checked):
    each token's offset is the index of the character its first byte is in, the same streamed or whole."""
    tokenizer = Tokenizer(resolve_model_path("tiny"))
    text, ids, offsets = _logprobs(url, stream=False)
    assert len(ids) == len(offsets) == 40
    assert any(0x80 <= i < 0x100 for i in ids), ids  # a byte of a multi-byte character, at least
    data = b"".join(_token_bytes(tokenizer, i) for i in ids)
    assert data.decode(errors="replace") == text  # the instance decodes bytes as Python does
    starts = [len(b"".join(_token_bytes(tokenizer, i) for i in ids[:k])) for k in range(len(ids))]
    assert offsets == [_character_at(data, start) for start in starts], (text, ids)
    assert _logprobs(url, stream=True) == (text, ids, offsets)


def _character_at(data: bytes, start: int) -> int:
    """The index, in the text of `data`, of the character holding byte `start`: one that ends the bytes before it
    in a U+FFFD a later byte completes is that character; one that a later byte leaves as it is is a character."""
    before = data[:start].decode(errors="replace")
    return len(before) if data.decode(errors="replace").startswith(before) else len(before) - 1
