"""The proxy's piece-cached encoder (proxy/prompt_pieces.py) gives Tokenizer.encode's ids, its errors too, and
refuses to cut a text where a tokenizer would encode the pieces otherwise than the whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors, trainers

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.demo import resolve_model_path
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.proxy.prompt_pieces import PieceTokenizer

SPECIALS = ["<s>", "</s>", "<|user|>", "<|end|>"]
CORPUS = ["hello world foo bar the quick brown fox jumps over the lazy dog", "  spaced  out\n\nlines\tand tabs"] * 20


def _checkpoint(tmp_path: Path, pre: object, post: object | None = None, add_bos: bool = False,
                special: list[object] | None = None) -> Tokenizer:
    """A small trained BPE checkpoint with `pre` as its pre-tokenizer and `post` as its post-processor."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre, pre_tokenizers.ByteLevel) else []
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=special or SPECIALS,
                                                        initial_alphabet=alphabet))
    if post is not None:
        tok.post_processor = post
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": add_bos,
         "chat_template": "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>\n{% endfor %}"}))
    return Tokenizer(tmp_path)


def _texts() -> list[str]:
    turn = "<|user|>hello world  the fox<|end|>\n"
    return ["", "plain text, no added token", "<s>", "<s><s> twice", "<s>" + turn * 3, turn * 4 + "<|user|>",
            "  lead<|end|>  trail  ", "</s></s>", "<|user|><|end|>" * 3 + "x", "é ü<|end|>\n\n<|user|>\t tabs  "]


@pytest.mark.parametrize("add_bos", [False, True])
def test_pieces_give_the_whole_texts_ids_for_the_demo_tokenizer(add_bos: bool) -> None:
    tokenizer = Tokenizer(resolve_model_path("tiny"))
    tokenizer.add_bos_token = add_bos
    pieces = PieceTokenizer(tokenizer)
    assert pieces.why_whole is None
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    texts = [bos + bos + "hi", bos + "<|user|>\nhi" + eos, "<|system|>\nsys" + eos + "\n<|user|>\nu" + eos + "\n",
             "no specials at all", eos, "x" + eos + eos + "y"]
    for text in texts:
        for flag in (False, True):
            assert pieces.encode(text, flag) == tokenizer.encode(text, add_special_tokens=flag), (text, flag)
            assert pieces.encode(text, flag) == tokenizer.encode(text, add_special_tokens=flag)  # from the cache


@pytest.mark.parametrize("pre", [pre_tokenizers.ByteLevel(add_prefix_space=True),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False),
                                 pre_tokenizers.Metaspace(prepend_scheme="always"), pre_tokenizers.Whitespace()])
def test_pieces_give_the_whole_texts_ids_for_tokenizers_that_allow_them(tmp_path: Path, pre: object) -> None:
    post = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = _checkpoint(tmp_path, pre, post, add_bos=True)
    pieces = PieceTokenizer(tokenizer)
    assert pieces.why_whole is None
    for text in _texts():
        for flag in (False, True):
            assert pieces.encode(text, flag) == tokenizer.encode(text, add_special_tokens=flag), (text, flag)


def test_a_conversations_next_turn_encodes_only_its_new_pieces() -> None:
    tokenizer = Tokenizer(resolve_model_path("tiny"))
    pieces = PieceTokenizer(tokenizer)
    messages = [{"role": "system", "content": "be brief " * 200}]
    for turn in range(4):
        messages.append({"role": "user", "content": f"question {turn} " * 30})
        text = tokenizer.apply_chat_template(messages)
        new = len(text) if turn == 0 else len(tokenizer.apply_chat_template(messages[-2:]))
        assert pieces.uncached_chars(text, False) <= new + len("<|assistant|>\n")
        assert pieces.encode(text, False) == tokenizer.encode(text, add_special_tokens=False)
        assert pieces.uncached_chars(text, False) == 0
        messages.append({"role": "assistant", "content": f"answer {turn} " * 50})


def test_a_piece_cache_past_its_bound_forgets_the_oldest_and_stays_exact() -> None:
    tokenizer = Tokenizer(resolve_model_path("tiny"))
    pieces = PieceTokenizer(tokenizer, max_cached_bytes=4000)
    texts = [f"<|user|>\nmessage {i} " * 20 + "<|end_of_text|>" for i in range(30)]
    for text in texts * 2:
        assert pieces.encode(text, True) == tokenizer.encode(text)
    assert pieces.uncached_chars(texts[0], True) > 0  # evicted by the later ones


def test_a_lone_surrogate_is_refused_as_a_whole_encode_refuses_it() -> None:
    tokenizer = Tokenizer(resolve_model_path("tiny"))
    text = "<|user|>\nfine<|end_of_text|>\n<|user|>\nbad \ud800 here<|end_of_text|>"
    with pytest.raises(PdlaunchError) as whole:
        tokenizer.encode(text)
    with pytest.raises(PdlaunchError) as piecewise:
        PieceTokenizer(tokenizer).encode(text)
    assert piecewise.value.render() == whole.value.render()  # the character's place in the whole text


def _cut_naively(tokenizer: Tokenizer, text: str, cut: str) -> list[int]:
    """The ids of `text` encoded as two pieces cut after the first `cut`, without the conditions' check."""
    at = text.index(cut) + len(cut)
    return tokenizer.encode(text[:at], add_special_tokens=False) + tokenizer.encode(text[at:], add_special_tokens=False)


def test_a_metaspace_that_prepends_only_to_the_first_stretch_is_encoded_whole(tmp_path: Path) -> None:
    tokenizer = _checkpoint(tmp_path, pre_tokenizers.Metaspace(prepend_scheme="first"))
    text = "<|user|>hello world<|end|>foo bar"
    assert _cut_naively(tokenizer, text, "<|end|>") != tokenizer.encode(text, add_special_tokens=False)  # would differ
    pieces = PieceTokenizer(tokenizer)
    assert pieces.why_whole is not None and "Metaspace" in pieces.why_whole
    assert pieces.pieces(text, False) is None
    assert pieces.encode(text, False) == tokenizer.encode(text, add_special_tokens=False)


def test_a_post_processor_that_adds_after_the_text_is_encoded_whole(tmp_path: Path) -> None:
    post = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    tokenizer = _checkpoint(tmp_path, pre_tokenizers.ByteLevel(add_prefix_space=False), post)
    text = "<|user|>hi<|end|>\n<|user|>there<|end|>\n"
    pieces = PieceTokenizer(tokenizer)
    assert pieces.why_whole is not None and "post-processor" in pieces.why_whole
    assert pieces.encode(text, True) == tokenizer.encode(text)
    assert tokenizer.encode(text)[-1] == tokenizer.token_to_id("</s>")  # a first piece's own </s> would sit inside


def test_an_added_token_that_strips_whitespace_is_encoded_whole(tmp_path: Path) -> None:
    from tokenizers import AddedToken

    special = [AddedToken("<s>", special=True), AddedToken("</s>", special=True),
               AddedToken("<|user|>", special=True), AddedToken("<|end|>", special=True, rstrip=True)]
    tokenizer = _checkpoint(tmp_path, pre_tokenizers.ByteLevel(add_prefix_space=False), special=special)
    text = "<|user|>hi<|end|>   spaced"
    assert _cut_naively(tokenizer, text, "<|end|>") != tokenizer.encode(text, add_special_tokens=False)  # would differ
    pieces = PieceTokenizer(tokenizer)
    assert pieces.why_whole is not None and "<|end|>" in pieces.why_whole
    assert pieces.encode(text, False) == tokenizer.encode(text, add_special_tokens=False)


def test_a_tokenizer_that_truncates_is_encoded_whole(tmp_path: Path) -> None:
    tokenizer = _checkpoint(tmp_path, pre_tokenizers.ByteLevel(add_prefix_space=False))
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = Tokenizer(tmp_path)
    text = "<|user|>hello world the fox<|end|>\n" * 3
    pieces = PieceTokenizer(tokenizer)
    assert pieces.why_whole == "tokenizer.json truncates or pads"
    assert pieces.encode(text, False) == tokenizer.encode(text, add_special_tokens=False)
    assert len(_cut_naively(tokenizer, text, "<|end|>")) > 8  # pieces would pass the whole text's bound


def test_the_probe_at_start_refuses_pieces_that_the_checks_let_through(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from pdlaunch.proxy import prompt_pieces

    tokenizer = _checkpoint(tmp_path, pre_tokenizers.Metaspace(prepend_scheme="first"))
    monkeypatch.setattr(prompt_pieces, "_why_whole", lambda spec: None)  # a kind the checks do not know
    pieces = PieceTokenizer(tokenizer)
    assert pieces.why_whole == "its pieces' ids differed from the whole text's on a probe"
    text = "<|user|>hello world<|end|>foo bar"
    assert pieces.encode(text, False) == tokenizer.encode(text, add_special_tokens=False)


def test_the_added_tokens_scan_finds_the_leftmost_longest_as_an_alternation_does() -> None:
    import random
    import re

    from pdlaunch.proxy.prompt_pieces import _added_pattern

    rng = random.Random(7)
    for _ in range(200):
        contents = sorted({"".join(rng.choice("<|>ab") for _ in range(rng.randint(1, 5))) for _ in range(8)},
                          key=len, reverse=True)
        text = "".join(rng.choice("<|>abc") for _ in range(60))
        alternation = re.compile("|".join(map(re.escape, contents)))
        assert [m.span() for m in _added_pattern(contents).finditer(text)] == \
            [m.span() for m in alternation.finditer(text)], (contents, text)


def test_a_text_of_added_token_openings_is_scanned_in_time_under_thousands_of_added_tokens() -> None:
    """The scan runs on the proxy's event loop: an alternation of 6,000 tokens tried each at every "<|" of a
    client's text took ~4 s for these 600k characters (a 2-core CPU), the trie a few ms."""
    import time

    from pdlaunch.proxy.prompt_pieces import _added_pattern

    contents = sorted([f"<|reserved_special_token_{i}|>" for i in range(6000)] + ["<|eot_id|>"], key=len, reverse=True)
    pattern = _added_pattern(contents)
    text = "<|" * 300_000 + "<|eot_id|>"
    started = time.perf_counter()
    assert [m.end() for m in pattern.finditer(text)] == [len(text)]
    assert time.perf_counter() - started < 1.0
