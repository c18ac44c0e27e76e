"""spaces_between_special_tokens as vLLM v1 applies it to a fast tokenizer (the only kind pdlaunch loads; its
FastIncrementalDetokenizer): true, vLLM's default, keeps the tokenizer's own joining, exactly as leaving the field
out; false drops only what that joining puts between two ADJACENT added tokens (each such token's text is its own).
It used to join every special token and every run of text between them with a space when true was sent."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from pdlaunch.engine.output_processor import OutputProcessor
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.request import Request
from pdlaunch.model.demo_tokenizer import EOS_TOKEN_ID, write_tokenizer_files
from pdlaunch.model.tokenizer import Tokenizer

CLS, SEP, HI, S, THERE, NEW = 1, 2, 3, 5, 4, 6  # ids of the WordPiece tokenizer below; NEW: added, not special


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A WordPiece tokenizer: its decoder joins tokens, added ones too, with a space."""
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hi": 3, "there": 4, "##s": 5}
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[CLS]", "[SEP]"])
    tok.add_tokens(["<new>"])
    directory = tmp_path_factory.mktemp("wordpiece")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[SEP]"}))
    return Tokenizer(directory)


def streamed(tokenizer: Tokenizer, prompt: Sequence[int], output: Sequence[int], spaces: bool | None) -> str:
    """The text the engine hands out for `output`, token by token (the field left out when `spaces` is None)."""
    fields = {} if spaces is None else {"spaces_between_special_tokens": spaces}
    params = SamplingParams(max_tokens=len(output), skip_special_tokens=False, ignore_eos=True, **fields)
    processor = OutputProcessor(tokenizer.decode, [], max_model_len=1000)
    request = Request("r", list(prompt), params, arrival=0)
    processor.add(request)
    return "".join(processor.append_token(request, t).text for t in output)


def test_true_is_the_tokenizers_own_joining_as_leaving_it_out(wordpiece: Tokenizer) -> None:
    ids = [CLS, SEP, HI, S, THERE, SEP, SEP]
    own = "[CLS] [SEP] his there [SEP] [SEP]"
    assert wordpiece.decode(ids, skip_special_tokens=False) == own
    assert wordpiece.decode(ids, False, True) == own
    assert streamed(wordpiece, [HI], ids, True) == streamed(wordpiece, [HI], ids, None) == " " + own


def test_false_drops_the_space_between_adjacent_added_tokens_only(wordpiece: Tokenizer) -> None:
    ids = [CLS, SEP, HI, S, THERE, SEP, SEP, NEW, HI]
    joined = "[CLS][SEP] his there [SEP][SEP]<new> hi"
    assert wordpiece.decode(ids, False, False) == joined
    assert streamed(wordpiece, [HI], ids, False) == " " + joined
    # skipped special tokens leave nothing to join: the field changes nothing then
    assert wordpiece.decode(ids, True, False) == wordpiece.decode(ids, True, True) == "his there <new> hi"


def test_on_the_demo_tokenizer_the_field_changes_nothing(tmp_path: Path) -> None:
    """Byte-level BPE joins special tokens with nothing: true, false and left out give the same text (true used to
    put a space before each special token, the first one included)."""
    write_tokenizer_files(tmp_path)
    tokenizer = Tokenizer(tmp_path)
    prompt = tokenizer.encode("Hi", add_special_tokens=False)
    output = [EOS_TOKEN_ID, EOS_TOKEN_ID, *tokenizer.encode("ab", add_special_tokens=False), EOS_TOKEN_ID]
    eos = tokenizer.decode([EOS_TOKEN_ID], skip_special_tokens=False)
    texts = {spaces: streamed(tokenizer, prompt, output, spaces) for spaces in (None, True, False)}
    assert set(texts.values()) == {f"{eos}{eos}ab{eos}"}, texts
