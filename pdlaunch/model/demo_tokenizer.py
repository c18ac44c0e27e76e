"""The demo tokenizer: byte-level BPE built locally (no hub), identical on every machine.

Ids 0..255 are the 256 byte tokens (in byte order), then BPE merges learned from the small
embedded text below with a deterministic tie-break, then the five special tokens at the end of
the 512-id vocabulary. Test checkpoints reuse these files so every tokenizer in the project has
the same ids.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pydantic import JsonValue
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|system|>", "<|user|>", "<|assistant|>"]
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
NUM_MERGES = VOCAB_SIZE - 256 - len(SPECIAL_TOKENS)
BOS_TOKEN_ID = VOCAB_SIZE - len(SPECIAL_TOKENS)
EOS_TOKEN_ID = BOS_TOKEN_ID + 1

# Renders messages as `<|role|>\ncontent<|end_of_text|>\n`; BOS is added by encode(), not here,
# so a rendered prompt tokenized with special tokens gets exactly one BOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end_of_text|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. A prefill instance reads the whole prompt and writes
its keys and values into the cache; a decode instance receives those blocks and generates one token
at a time. The proxy in front of them makes the pair look like one server, so a client that speaks
the OpenAI protocol does not need to know where the work happens. Hello, world! How are you today?
I am fine, thank you. What is the capital of France? The capital of France is Paris. What is the
capital of Italy? The capital of Italy is Rome. Once upon a time there was a little model that
wanted to tell stories. It read the prompt, it thought for a while, and then it answered in its own
words. The answer was not always right, but it was always the same for the same question, because
the model was deterministic and the weights were the same on every machine.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 128 256 512 1024 2048 4096 8192.
def main():
    for index in range(10):
        print("hello", index)
    return 0
The server is ready. The request is done. The tokens are streamed back to the user as soon as they
are generated, and the time to first token is measured from the moment the request arrives. When
the memory of the device runs out, the scheduler preempts a request and computes it again later.
Every block that leaves the free list comes back to it; every process that starts is reaped.
You are a helpful assistant. Please answer the question in one short sentence. Thank you!
"""


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table that byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merge learning. Ties are broken by the pair's text so the result never varies.

    Merges continue down to pairs seen once so that every id below the specials is a real token.
    """
    pieces = [piece for piece, _ in _pre_tokenizer().pre_tokenize_str(text)]
    words: Counter[tuple[str, ...]] = Counter(tuple(piece) for piece in pieces)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def build_demo_tokenizer() -> Tokenizer:
    """The demo `tokenizers.Tokenizer` (BOS added by its post-processor)."""
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    merges = _learn_merges(_TRAINING_TEXT, NUM_MERGES)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    # Specials take the last ids, whatever the number of merges learned.
    specials_start = VOCAB_SIZE - len(SPECIAL_TOKENS)
    while tokenizer.get_vocab_size(with_added_tokens=True) < specials_start:
        filler = f"<|reserved_{tokenizer.get_vocab_size(with_added_tokens=True)}|>"
        tokenizer.add_special_tokens([AddedToken(filler, special=True, normalized=False)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )
    return tokenizer


def write_tokenizer_files(directory: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (chat template, bos/eos) into `directory`."""
    tokenizer = build_demo_tokenizer()
    if tokenizer.token_to_id(BOS_TOKEN) != BOS_TOKEN_ID or tokenizer.token_to_id(EOS_TOKEN) != EOS_TOKEN_ID:
        raise RuntimeError("demo tokenizer special ids moved; the vocabulary layout above is broken")
    tokenizer.save(str(directory / "tokenizer.json"), pretty=False)
    added = {
        str(tokenizer.token_to_id(tok)): {"content": tok, "special": True, "normalized": False,
                                           "lstrip": False, "rstrip": False, "single_word": False}
        for tok in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "add_bos_token": True,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def generation_config(bos_token_id: int = BOS_TOKEN_ID, eos_token_id: int = EOS_TOKEN_ID) -> dict[str, JsonValue]:
    """generation_config.json contents for checkpoints that use the demo tokenizer."""
    return {"bos_token_id": bos_token_id, "eos_token_id": [eos_token_id], "do_sample": False}
