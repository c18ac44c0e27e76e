"""Completions' logprobs text_offset: where each token of a choice begins in its text (server/responses.py)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pdlaunch.engine.detokenizer import Decode

CONTEXT_TOKENS = 6  # prompt tokens decoded before the output, as the engine's detokenizer does (leading spaces)


class TextOffsets:
    """Completions' text_offset: where each token begins in the choice's text, in characters of that text as the
    engine's incremental detokenizer makes it (engine/detokenizer.py: the same windows of context, and text handed
    out only once it does not end in U+FFFD). A token inside a multi-byte character begins where the character
    does: its bytes make no character of their own (decoded alone each is a U+FFFD, and summing those put every
    later token past its place in the text). A U+FFFD that a later token leaves as it is stood for bytes that
    never become a character, so that token begins after it."""

    def __init__(self, decode: Decode, start: int = 0, context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids = list(context[-CONTEXT_TOKENS:])
        self._prefix, self._read = 0, len(self._ids)  # the window: context, then the held tokens
        self._prefix_text = decode(self._ids)
        self._held = ""  # the text of the tokens after _read, not handed out (it ends in U+FFFD)
        self._done = start  # characters of the text before the held tokens

    def of(self, token_ids: Iterable[int]) -> list[int]:
        """The offsets of the next tokens of the text."""
        offsets = []
        for token_id in token_ids:
            self._ids.append(token_id)
            text = self._decode(self._ids[self._prefix:])[len(self._prefix_text):]
            same = _common_prefix(self._held, text)
            # A new character after the ones it leaves as they were, or (none new) the last one it continues.
            offsets.append(self._done + (same if len(text) > same else max(0, same - 1)))
            if text and not text.endswith("\ufffd"):
                self._done += len(text)
                self._prefix, self._read = self._read, len(self._ids)
                self._prefix_text, self._held = self._decode(self._ids[self._prefix:]), ""
            else:
                self._held = text
        return offsets


def _common_prefix(a: str, b: str) -> int:
    """How many leading characters `a` and `b` share."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))
