"""SentencePiece GGUF tokenizers (`tokenizer.ggml.model == "llama"`: Llama 2, Mistral 7B v0.1-0.3). The
reference is the `sentencepiece` package itself: a BPE model trained here with byte fallback, written into a
GGUF as llama.cpp's converter writes one, must encode to SentencePiece's ids (BOS first, as LlamaTokenizer
adds it) and decode back to the text; transformers' own GGUF tokenizer loader gives the same ids except on
text that starts with whitespace (its Metaspace adds no "▁" there; SentencePiece and llama.cpp do)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pdlaunch.engine.detokenizer import IncrementalDetokenizer
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.gguf.convert import convert_gguf
from pdlaunch.model.gguf.sentencepiece import merges
from pdlaunch.model.tokenizer import Tokenizer
from tests.config.cli_helpers import assert_invalid, check
from tests.model.gguf_files import gguf, write_gguf
from tests.model.gguf_spm_files import (
    BOS,
    CHAT_TEMPLATE,
    END_INST,
    EOS,
    INST,
    UNK,
    make_mistral_shaped,
    spm_tokenizer_writer,
    train_sentencepiece,
    training_text,
)

EDGE_CASES = ["", "a", "hello  world", "tail   ", "\n\nx", "a\tb\t\tc", "12345 678", "x\n", "ÿ 😀 ☃ \u0000 \x7f",
              "Ωmega 東京タワー", "never seen: ꙮ ᚠ 𝔘", "émigré—“quoted”", " leading", "   three", "\t tab first"]


@pytest.fixture(scope="module")
def sp() -> Any:
    return train_sentencepiece()


@pytest.fixture(scope="module")
def hf_dir(sp: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mistral_shaped(tmp_path_factory.mktemp("hf") / "mistral", sp.get_piece_size())


@pytest.fixture(scope="module")
def gguf_file(sp: Any, hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    return write_gguf(hf_dir, path, "llama", add_tokenizer=spm_tokenizer_writer(sp))


@pytest.fixture(scope="module")
def converted(gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("conv")
    convert_gguf(gguf_file, out)
    return out


def _texts() -> list[str]:
    return training_text(seed=5, lines=200) + EDGE_CASES


def test_ids_equal_sentencepiece_ids_and_decode_round_trips(sp: Any, converted: Path) -> None:
    tokenizer = Tokenizer(converted)
    for text in _texts():
        ids = tokenizer.encode(text)
        assert ids == [BOS, *sp.encode(text)], text
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tokenizer.decode(ids) == text == sp.decode(ids[1:])
    # unseen characters fall back to their UTF-8 bytes, as SentencePiece does
    assert [sp.id_to_piece(i) for i in tokenizer.encode("ꙮ", add_special_tokens=False)] == \
        ["▁", "<0xEA>", "<0x99>", "<0xAE>"]


def test_streamed_text_is_the_text(sp: Any, converted: Path) -> None:
    """Token by token (the engine's incremental detokenizer), "▁" spaces and byte-fallback characters
    come out as SentencePiece decodes them."""
    tokenizer = Tokenizer(converted)
    for text in _texts():
        detokenizer = IncrementalDetokenizer(tokenizer.decode, [BOS])
        streamed = "".join(detokenizer.add(token_id) for token_id in sp.encode(text)) + detokenizer.finish()
        assert streamed == text, text


def test_transformers_gguf_loader_agrees_unless_text_starts_with_whitespace(sp: Any, converted: Path,
                                                                           gguf_file: Path) -> None:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    ours = Tokenizer(converted)
    texts = _texts()
    plain = [t for t in texts if t and not t[0].isspace()]
    assert len(plain) > 150
    for text in plain:
        assert ours.encode(text) == theirs.encode(text), text
    # "   three": SentencePiece (and llama.cpp) add the dummy "▁" prefix before the spaces; theirs does not
    assert ours.encode("   three") == [BOS, *sp.encode("   three")] != theirs.encode("   three")


def test_special_tokens_config_and_chat_template(sp: Any, converted: Path) -> None:
    tokenizer = Tokenizer(converted)
    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert tokenizer.add_bos_token and tokenizer.bos_token_id == BOS and tokenizer.eos_token_ids == [EOS]
    assert tokenizer.token_to_id("<unk>") == UNK
    assert tokenizer.encode("<s>hi") == tokenizer.encode("hi")  # the BOS text is the BOS token, not added twice
    assert tokenizer.encode("hi</s>", add_special_tokens=False)[-1] == EOS
    assert tokenizer.decode([BOS, *tokenizer.encode("hi", add_special_tokens=False), EOS]) == "hi"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert prompt == "<s>[INST] What is 2+2? [/INST]" and tokenizer.chat_template == CHAT_TEMPLATE
    # text after a control token gets the "▁" prefix again, as llama.cpp tokenizes it (' ' + text)
    assert tokenizer.encode(prompt) == [BOS, INST, *sp.encode(" What is 2+2? "), END_INST]


def test_merges_follow_the_scores() -> None:
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc", "<0x61>"]
    scores = [0.0, -10.0, -11.0, -12.0, -2.0, -1.0, -3.0, 0.0]
    types = [2, 1, 1, 1, 1, 1, 1, 6]
    assert merges(tokens, scores, types) == [["b", "c"], ["a", "b"], ["a", "bc"], ["ab", "c"]]


def test_add_eos_token_appends_eos(sp: Any, hf_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(hf_dir, tmp_path / "eos.gguf", "llama", add_tokenizer=spm_tokenizer_writer(sp, add_eos=True))
    out = tmp_path / "conv"
    out.mkdir()
    convert_gguf(path, out)
    assert Tokenizer(out).encode("hello") == [BOS, *sp.encode("hello"), EOS]
    assert Tokenizer(out).encode("hello", add_special_tokens=False) == sp.encode("hello")


def _writer_without_add_bos(sp: Any) -> Any:
    full = spm_tokenizer_writer(sp, template=False)

    def add(writer: Any) -> None:
        original = writer.add_add_bos_token
        writer.add_add_bos_token = lambda _: None  # an older file: no tokenizer.ggml.add_bos_token
        full(writer)
        writer.add_add_bos_token = original
    return add


def test_older_file_without_add_bos_still_gets_bos(sp: Any, hf_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(hf_dir, tmp_path / "old.gguf", "llama", add_tokenizer=_writer_without_add_bos(sp))
    assert "tokenizer.ggml.add_bos_token" not in gguf.GGUFReader(str(path)).fields
    out = tmp_path / "conv"
    out.mkdir()
    convert_gguf(path, out)
    assert Tokenizer(out).encode("hello") == [BOS, *sp.encode("hello")]
    assert not (out / "chat_template.jinja").exists()


@pytest.mark.parametrize(("broken", "message"), [
    ({"drop": "scores"}, "GGUF SentencePiece tokenizer lacks tokenizer.ggml.scores (needed to rebuild its merges)"),
    ({"drop": "token_type"}, "GGUF SentencePiece tokenizer lacks tokenizer.ggml.token_type"),
    ({"types_len": 399}, "GGUF tokenizer.ggml.token_type has 399 entries for 400 tokens"),
    ({"bos": 400}, "GGUF tokenizer.ggml.bos_token_id is 400, outside the 400-token vocabulary"),
])
def test_broken_sentencepiece_metadata_is_a_model_error(sp: Any, hf_dir: Path, tmp_path: Path,
                                                        broken: dict[str, Any], message: str) -> None:
    path = write_gguf(hf_dir, tmp_path / "bad.gguf", "llama", add_tokenizer=spm_tokenizer_writer(sp, **broken))
    assert_invalid(check(["--model", str(path), "--device", "cpu"]), "--model", message)
    with pytest.raises(PdlaunchError, match="re-download or re-convert") as err:
        convert_gguf(path, tmp_path)
    assert err.value.field == "model.path" and message in err.value.message
