"""The proxy's prompt encoder: a text is cut after each of its added tokens (a chat template's role and end-of-turn
markers) and each piece's token ids are kept, so a multi-turn conversation's turn encodes only the messages that the
earlier turns did not send. Encoding a 10k-token conversation whole took 4-5 ms of the event loop's GIL on a 2-core
CPU each turn (the demo tokenizer; benchmarks/prompt_tokens_speed.py), its new turn a fifth of that.

Why the pieces' ids, joined, are the whole text's ids. `tokenizers` encodes a text in stages: it first finds the
added tokens (leftmost-longest, scanning left to right), then normalizes and pre-tokenizes each stretch between them
on its own, runs the model on each pre-token on its own, and last lets the post-processor add special tokens around
the whole. The cuts are where the whole text's own added-token matches end (found here as that scan finds them), so
a piece scanned alone holds the same matches; each stretch between matches is the same string, normalized and
pre-tokenized alone in both cases. That holds while:
- no added token strips whitespace around it (lstrip, rstrip), matches only whole words (single_word) or is matched
  after normalizing (normalized): each would make a match depend on what lies across a cut;
- the normalizer and the pre-tokenizer do the same to a stretch wherever it lies: the known kinds do, except a
  Metaspace that prepends its space only to the text's first stretch (prepend_scheme "first"), which is refused;
- the post-processor adds nothing after the text (a BOS before it is kept: the first piece is encoded with the
  request's add_special_tokens), and tokenizer.json truncates and pads nothing.
The first piece runs to the end of the second match, so that Tokenizer.encode's own rules on the text's first two
ids (one BOS, never two) see what they see in the whole text. A text that is not valid Unicode is encoded whole
(Tokenizer.encode answers its 400, naming the character as before). A tokenizer outside these conditions, or whose
pieces differ from the whole on a probe at start, encodes every text whole, as before.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict

from pydantic import JsonValue

from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.proxy.bodies import JsonObject

log = logging.getLogger("pdlaunch.proxy")

MAX_CACHED_BYTES = 32 << 20  # the pieces' text and ids kept, estimated as below (LRU)
ID_BYTES = 36  # a token id in a Python list: its pointer and, past 256, its int object

Piece = tuple[bool, str]  # (encoded with add_special_tokens, the text): the first piece's flag is the request's

# Normalizers and pre-tokenizers that treat a stretch between added tokens alike wherever it lies in the text.
_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents", "Replace", "Prepend",
                "BertNormalizer", "Nmt", "Precompiled", "ByteLevel"}
_PRE_TOKENIZERS = {"ByteLevel", "Whitespace", "WhitespaceSplit", "Punctuation", "Digits", "Split", "BertPreTokenizer",
                   "CharDelimiterSplit", "UnicodeScripts"}


def _why_whole(spec: JsonObject) -> str | None:
    """Why a tokenizer (its tokenizer.json) must encode every text whole; None when pieces are safe (module doc)."""
    if spec.get("truncation") is not None or spec.get("padding") is not None:
        return "tokenizer.json truncates or pads"
    for token in _objects(spec.get("added_tokens")):
        if any(token.get(flag) for flag in ("lstrip", "rstrip", "single_word", "normalized")):
            return f"its added token {token.get('content')!r} strips, matches whole words or is normalized"
    for stage, kinds, key in (("normalizer", _NORMALIZERS, "normalizers"),
                              ("pre_tokenizer", _PRE_TOKENIZERS, "pretokenizers")):
        why = _why_stage(spec.get(stage), kinds, key)
        if why is not None:
            return f"its {stage}: {why}"
    return _why_post_processor(spec.get("post_processor"))


def _objects(value: JsonValue) -> list[JsonObject]:
    """The objects of a JSON list; anything else in it (or a value that is no list) as an empty object, whose
    missing type is refused where a type is needed."""
    return [v if isinstance(v, dict) else {} for v in value] if isinstance(value, list) else []


def _why_stage(stage: JsonValue, kinds: set[str], key: str) -> str | None:
    if stage is None:
        return None
    kind = stage.get("type") if isinstance(stage, dict) else None
    if kind == "Sequence" and isinstance(stage, dict):
        return next((why for part in _objects(stage.get(key)) if (why := _why_stage(part, kinds, key))), None)
    if kind == "Metaspace" and isinstance(stage, dict) and stage.get("prepend_scheme") in ("always", "never"):
        return None
    return None if kind in kinds else f"a {kind} (it may treat the text's first stretch apart)"


def _why_post_processor(processor: JsonValue) -> str | None:
    if processor is None:
        return None
    kind = processor.get("type") if isinstance(processor, dict) else None
    if kind == "Sequence" and isinstance(processor, dict):
        parts = _objects(processor.get("processors"))
        return next((why for part in parts if (why := _why_post_processor(part))), None)
    if kind == "ByteLevel":
        return None
    if kind == "TemplateProcessing" and isinstance(processor, dict):
        single = _objects(processor.get("single"))
        if single and "Sequence" in single[-1]:  # the text last: what it adds goes before the text
            return None
    return f"its post-processor {kind} adds tokens after the text"


_Trie = dict[str, "_Trie"]  # char -> subtree; the key "" marks a content's end


def _added_pattern(contents: list[str]) -> re.Pattern[str]:
    """A regex matching the longest of `contents` at the leftmost place, as tokenizers' own scan (leftmost-longest):
    their trie, so that a place costs a walk down it. An alternation of the contents, longest first, matches alike
    but tries every one at every place that could start one: a text of "<|" repeated held the event loop 0.4 s a
    megabyte under Llama 3's 256 added tokens, 9 s under 6,000 (uncached_chars runs there). The alternation stays
    for a trie nested past Python's recursion."""
    trie: _Trie = {}
    for content in contents:
        node = trie
        for char in content:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: _Trie) -> str:
        chain = ""
        while len(node) == 1 and "" not in node:  # one way on: no group needed
            char, node = next(iter(node.items()))
            chain += re.escape(char)
        branches = [re.escape(char) + pattern(child) for char, child in node.items() if char]
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")" if branches else ""
        return chain + (f"(?:{body})?" if "" in node and body else body)  # greedy: the longer first

    try:
        return re.compile(pattern(trie))
    except RecursionError:
        return re.compile("|".join(map(re.escape, sorted(contents, key=len, reverse=True))))


class PieceTokenizer:
    """Tokenizer.encode's ids, its pieces' ids kept across requests (module doc); `apply_chat_template` is the
    tokenizer's, so server/prompts.tokenize takes this in its place. Thread-safe: the proxy encodes long prompts in
    worker threads while its event loop encodes short ones."""

    def __init__(self, tokenizer: Tokenizer, max_cached_bytes: int = MAX_CACHED_BYTES) -> None:
        self.tokenizer = tokenizer
        self.apply_chat_template = tokenizer.apply_chat_template
        self._max_bytes, self._bytes = max_cached_bytes, 0
        self._cache: OrderedDict[Piece, list[int]] = OrderedDict()
        self._lock = threading.Lock()
        spec: JsonObject = json.loads(tokenizer.to_json())
        added = {t.get("content") for t in _objects(spec.get("added_tokens"))}
        contents = sorted((c for c in added if isinstance(c, str) and c), key=len, reverse=True)
        self.why_whole = _why_whole(spec)
        if self.why_whole is None and tokenizer.bos_token and tokenizer.bos_token not in contents:
            self.why_whole = "its BOS text is not an added token"  # the one-BOS rule reads the text's start
        self._added = _added_pattern(contents) if contents and self.why_whole is None else None
        if self.why_whole is None and not self._probe(contents):
            self.why_whole = "its pieces' ids differed from the whole text's on a probe"
        if self.why_whole is not None:
            self._added = None
            log.info("prompts are encoded whole, without reusing earlier requests' pieces: %s", self.why_whole)

    def pieces(self, text: str, add_special_tokens: bool) -> list[Piece] | None:
        """`text` cut after its added tokens (the first piece after the second); None: encoded whole."""
        if self._added is None:
            return None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # Tokenizer.encode answers it, naming the character in the whole text
            return None
        ends = [m.end() for m in self._added.finditer(text)]
        cuts = [0, *ends[1:-1]] if ends and ends[-1] == len(text) else [0, *ends[1:]]
        return [(i == 0 and add_special_tokens, text[start:end])
                for i, (start, end) in enumerate(zip(cuts, [*cuts[1:], len(text)], strict=True))]

    def uncached_chars(self, text: str, add_special_tokens: bool) -> int:
        """Characters of `text` that encoding it would tokenize (all of them when it is encoded whole)."""
        pieces = self.pieces(text, add_special_tokens)
        if pieces is None:
            return len(text)
        return sum(len(key[1]) for key in pieces if key not in self._cache)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenizer.encode(text, add_special_tokens): the same ids and the same errors."""
        pieces = self.pieces(text, add_special_tokens)
        if pieces is None:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        ids: list[int] = []
        for key in pieces:
            with self._lock:
                known = self._cache.get(key)
                if known is not None:
                    self._cache.move_to_end(key)
            if known is None:
                known = self.tokenizer.encode(key[1], add_special_tokens=key[0])
                self._keep(key, known)
            ids += known
        return ids

    def _keep(self, key: Piece, ids: list[int]) -> None:
        size = len(key[1]) + ID_BYTES * len(ids)
        if size > self._max_bytes:
            return
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = ids
            self._bytes += size
            while self._bytes > self._max_bytes:
                (_, text), old = self._cache.popitem(last=False)
                self._bytes -= len(text) + ID_BYTES * len(old)

    def _probe(self, contents: list[str]) -> bool:
        """Whether pieces join to the whole text's ids on a text holding every added token (up to 256 of them)
        between words, a BOS's double and runs of spaces: a check of the conditions above, not a proof."""
        words = ["  hello", " world\n", "\n\n", "x", " ", "foo bar  ", "", "é ü"]
        tokens = (contents[:256] * 2)[:512]
        text = "".join(t + words[i % len(words)] for i, t in enumerate(tokens)) + " tail"
        for flag in (False, True):
            doubled = [*contents[:4], *([self.tokenizer.bos_token] if self.tokenizer.bos_token else [])]
            for sample in (text, "plain text only", *(t + t + " after" for t in doubled)):
                pieces = self.pieces(sample, flag)
                joined = [i for key in pieces or [] for i in self.tokenizer.encode(key[1], add_special_tokens=key[0])]
                if pieces is not None and joined != self.tokenizer.encode(sample, add_special_tokens=flag):
                    return False
        return True
