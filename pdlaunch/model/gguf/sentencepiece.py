"""SentencePiece vocabularies in GGUF metadata (`tokenizer.ggml.model == "llama"`: Llama 2, Mistral 7B
v0.1-0.3), rebuilt as a `tokenizers` BPE with byte fallback that encodes what SentencePiece encodes.

llama.cpp's converter stores each piece (spaces as "▁"), its score and its type, but no merges. The
merges come back from the scores, as transformers' GGUF loader derives them: a piece that splits into
two pieces of the vocabulary is a merge of those two, ranked by the piece's score (SentencePiece's BPE
merges the adjacent pair whose joined piece scores highest). The "▁" prefix comes from a normalizer
rather than a Metaspace pre-tokenizer, so text that already starts with a space gets one more "▁", as
SentencePiece (add_dummy_prefix) and llama.cpp do, and so does text after a special token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import JsonValue

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.gguf.metadata import value

if TYPE_CHECKING:
    from gguf import GGUFReader

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"
DAMAGED_TOKENIZER_HINT = "the file's tokenizer.ggml.* entries are damaged: re-download or re-convert it"


def _problem(message: str) -> PdlaunchError:
    return PdlaunchError(message, field="model.path", hint=DAMAGED_TOKENIZER_HINT)


def _vocabulary(reader: GGUFReader, tokens: list[str]) -> tuple[list[float], list[int]]:
    """The scores and token types, both one per token: without them the merges cannot be rebuilt."""
    scores = value(reader, "tokenizer.ggml.scores")
    types = value(reader, "tokenizer.ggml.token_type")
    for key, found in (("tokenizer.ggml.scores", scores), ("tokenizer.ggml.token_type", types)):
        if found is None:
            raise _problem(f"GGUF SentencePiece tokenizer lacks {key} (needed to rebuild its merges)")
        if len(found) != len(tokens):
            raise _problem(f"GGUF {key} has {len(found)} entries for {len(tokens)} tokens")
    unknown = sorted({int(kind) for kind in types} - {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE})
    if unknown:
        raise _problem(f"GGUF tokenizer.ggml.token_type holds unknown token type(s) {unknown}")
    return [float(score) for score in scores], [int(kind) for kind in types]


def special_id(reader: GGUFReader, key: str, count: int) -> int | None:
    """tokenizer.ggml.{key}_token_id, None when absent; one outside the `count`-token vocabulary is a damaged file."""
    index = value(reader, f"tokenizer.ggml.{key}_token_id")
    if index is None:
        return None
    if not 0 <= int(index) < count:
        raise _problem(f"GGUF tokenizer.ggml.{key}_token_id is {int(index)}, outside the {count}-token vocabulary")
    return int(index)


def merges(tokens: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """Every (left, right) pair of normal pieces that joins into a normal piece, best-scoring piece first."""
    ids = {tok: i for i, tok in enumerate(tokens) if types[i] == NORMAL}
    ranked: list[tuple[float, int, int]] = []
    for piece, index in ids.items():
        for cut in range(1, len(piece)):
            left, right = ids.get(piece[:cut]), ids.get(piece[cut:])
            if left is not None and right is not None:
                ranked.append((-scores[index], left, right))
    ranked.sort()
    return [[tokens[left], tokens[right]] for _, left, right in ranked]


def sentencepiece_tokenizer_json(reader: GGUFReader, tokens: list[str]) -> dict[str, JsonValue]:
    """tokenizer.json for a SentencePiece BPE vocabulary with byte fallback."""
    scores, types = _vocabulary(reader, tokens)
    for key in ("bos", "eos", "padding"):  # an id outside the vocabulary is a damaged file, not a missing token
        special_id(reader, key, len(tokens))
    unk = special_id(reader, "unknown", len(tokens))
    if unk is None:
        unk = next((i for i, kind in enumerate(types) if kind == UNKNOWN), None)
    added: list[JsonValue] = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind != USER_DEFINED}
             for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (UNKNOWN, CONTROL, USER_DEFINED)]
    prefix = bool(value(reader, "tokenizer.ggml.add_space_prefix", True))
    to_space: dict[str, JsonValue] = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    normalizer: dict[str, JsonValue] = {
        "type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, to_space] if prefix else [to_space]}
    decoders: list[JsonValue] = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": normalizer,
        "pre_tokenizer": None, "post_processor": _post_processor(reader, tokens),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": None if unk is None else tokens[unk],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": [[left, right] for left, right in merges(tokens, scores, types)]},
    }


def _post_processor(reader: GGUFReader, tokens: list[str]) -> dict[str, JsonValue] | None:
    """EOS appended when the metadata asks for it (BOS is the tokenizer config's add_bos_token)."""
    eos = special_id(reader, "eos", len(tokens))
    if not value(reader, "tokenizer.ggml.add_eos_token", False):
        return None
    if eos is None:
        raise _problem("GGUF tokenizer.ggml.add_eos_token is set but tokenizer.ggml.eos_token_id is missing")
    sequence: dict[str, JsonValue] = {"Sequence": {"id": "A", "type_id": 0}}
    eos_piece: dict[str, JsonValue] = {"SpecialToken": {"id": tokens[eos], "type_id": 0}}
    return {"type": "TemplateProcessing", "single": [sequence, eos_piece],
            "pair": [sequence, eos_piece, {"Sequence": {"id": "B", "type_id": 0}}, eos_piece],
            "special_tokens": {tokens[eos]: {"id": tokens[eos], "ids": [eos], "tokens": [tokens[eos]]}}}
