"""The tokenizer of a GGUF file, rebuilt from its metadata as tokenizer.json + tokenizer_config.json.

Byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: Llama 3, Qwen2/3, SmolLM) are rebuilt
the way transformers' own GGUF tokenizer converter builds them; SentencePiece vocabularies ("llama":
Llama 2, Mistral 7B v0.1-0.3) as a BPE with byte fallback (sentencepiece.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import JsonValue

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.gguf.metadata import value
from pdlaunch.model.gguf.sentencepiece import DAMAGED_TOKENIZER_HINT, sentencepiece_tokenizer_json, special_id

if TYPE_CHECKING:
    from gguf import GGUFReader

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types that are added (special) tokens
# How text is split before BPE (`tokenizer.ggml.pre`): Llama 3 groups digits by up to three, Qwen2 splits
# every digit. Other values keep GPT-2's byte-level split, as transformers' GGUF loader does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZER_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                        "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
NO_TOKENIZER_HINT = ("use a GGUF file that embeds its tokenizer (llama.cpp's converter writes tokenizer.ggml.*) "
                     "or the model's HF checkpoint directory with tokenizer.json")


def tokenizer_json(reader: GGUFReader) -> dict[str, JsonValue]:
    """tokenizer.json for a byte-level BPE (tokenizer.ggml.model "gpt2") or SentencePiece ("llama") vocabulary."""
    model = value(reader, "tokenizer.ggml.model")
    tokens: list[str] = list(value(reader, "tokenizer.ggml.tokens", []) or [])
    if model is None or not tokens:
        raise PdlaunchError("GGUF metadata holds no tokenizer (tokenizer.ggml.model and tokenizer.ggml.tokens)",
                            field="model.path", hint=NO_TOKENIZER_HINT)
    if model == "llama":
        return sentencepiece_tokenizer_json(reader, tokens)
    if model != "gpt2":
        raise PdlaunchError(f"GGUF tokenizer model {model!r} is not supported", field="model.path",
                            hint="pdlaunch rebuilds byte-level BPE (gpt2) and SentencePiece (llama) tokenizers "
                                 "from GGUF metadata; "
                                 "use an HF checkpoint directory with tokenizer.json for this model")
    # an id outside the vocabulary is a damaged file (as for SentencePiece): a BOS there had every request refused
    # after the conversion (check-config passed the file), an EOS there was never sampled, so no answer stopped at it
    for key in ("bos", "eos"):  # padding and unknown ones outside it are left out (tokenizer_config)
        special_id(reader, key, len(tokens))
    types: list[int] = list(value(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(types) != len(tokens):  # paired one to one below: a short list left the last specials split as text
        raise PdlaunchError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens",
                            field="model.path", hint=DAMAGED_TOKENIZER_HINT)
    merges: list[JsonValue] = list(value(reader, "tokenizer.ggml.merges", []))
    added: list[JsonValue] = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)]
    byte_level: dict[str, JsonValue] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                        "use_regex": True}
    pre_tokenizer: dict[str, JsonValue] = byte_level
    split = PRE_TOKENIZER_SPLITS.get(str(value(reader, "tokenizer.ggml.pre", "")))
    if split is not None:
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False}]}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": {**byte_level, "add_prefix_space": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)}, "merges": merges},
    }


def tokenizer_config(reader: GGUFReader) -> dict[str, JsonValue]:
    tokens = list(value(reader, "tokenizer.ggml.tokens", []) or [])

    def token(key: str) -> str | None:
        index = value(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    # llama.cpp adds BOS to a SentencePiece vocabulary whose metadata does not say otherwise (older files)
    add_bos = value(reader, "tokenizer.ggml.add_bos_token", value(reader, "tokenizer.ggml.model") == "llama")
    return {"bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding"),
            "unk_token": token("unknown"), "add_bos_token": bool(add_bos),
            "model_max_length": int(value(reader, f"{value(reader, 'general.architecture')}.context_length", 0))}
