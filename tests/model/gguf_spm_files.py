"""SentencePiece test vocabularies: a small BPE model trained with the `sentencepiece` package the way
Llama 2's was (byte fallback, split digits, identity normalization, whitespace kept), written into GGUF
metadata the way llama.cpp's converter writes a SentencePiece vocabulary (tokens, scores, token types,
special ids, add_bos), and a random Mistral-shaped checkpoint (GQA 4:1, untied embeddings) over it."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

spm = pytest.importorskip("sentencepiece")

VOCAB = 400
BOS, EOS, UNK = 1, 2, 0
INST, END_INST = 3, 4  # control tokens, as in Mistral v0.3's vocabulary
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
_WORDS = ("the quick brown fox jumps over lazy dog tokenizer merges scores pieces byte fallback mistral llama "
          "weather today is sunny rain tomorrow price costs dollars euros année café naïve façade über straße "
          "東京 日本語 テキスト 你好 世界 Привет мир γειά σου κόσμε مرحبا").split()
_SYMBOLS = list(",.;:!?()[]{}<>/\\|@#$%^&*-+=_~'\"`") + ["\t", "  ", "   ", "\n", " \n ", "😀", "→", "€"]


def training_text(seed: int = 0, lines: int = 160) -> list[str]:
    """A few KB of varied lines: words in several scripts, numbers, symbols, runs of spaces and tabs."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(4, 14)):
            roll = rng.random()
            if roll < 0.65:
                parts.append(rng.choice(_WORDS))
            elif roll < 0.8:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
            else:
                parts.append(rng.choice(_SYMBOLS))
        out.append(" ".join(parts) + rng.choice(["", " ", "  "]))
    return out


def train_sentencepiece(vocab_size: int = VOCAB, seed: int = 0) -> Any:
    """A SentencePieceProcessor for a BPE model trained with Llama 2's normalization and byte fallback."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text(seed)), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=1.0, unk_id=UNK, bos_id=BOS,
        eos_id=EOS, pad_id=-1, control_symbols=["[INST]", "[/INST]"], minloglevel=2, num_threads=1)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def token_type(sp: Any, i: int) -> int:
    """llama.cpp's converter: BYTE 6, UNKNOWN 2, CONTROL 3, UNUSED 5, else NORMAL 1."""
    if sp.is_byte(i):
        return 6
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    return 5 if sp.is_unused(i) else 1


def spm_tokenizer_writer(sp: Any, *, drop: str | None = None, types_len: int | None = None, bos: int = BOS,
                         template: bool = True, add_eos: bool = False) -> Callable[[Any], None]:
    """Writes `sp` as tokenizer.ggml.* metadata. `drop` leaves one key out ("scores", "token_type", ...),
    `types_len` writes that many token types, `bos` another BOS id: a broken file."""
    def add(writer: Any) -> None:
        count = sp.get_piece_size()
        types = [token_type(sp, i) for i in range(count)]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([sp.id_to_piece(i) for i in range(count)])
        if drop != "scores":
            writer.add_token_scores([sp.get_score(i) for i in range(count)])
        if drop != "token_type":
            writer.add_token_types((types * 2)[:types_len] if types_len is not None else types)
        writer.add_bos_token_id(bos)
        writer.add_eos_token_id(EOS)
        writer.add_unk_token_id(UNK)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(add_eos)
        if template:
            writer.add_chat_template(CHAT_TEMPLATE)
    return add


def make_mistral_shaped(directory: Path, vocab_size: int, *, seed: int = 7) -> Path:
    """A random Mistral-shaped Llama checkpoint (GQA 4:1, untied embeddings, 2 layers) for `vocab_size` tokens."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=1,
                         num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=512, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.1)
    torch.manual_seed(seed)
    # transformers leaves from_config unannotated
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS, "eos_token_id": EOS}))
    return directory
