"""Incremental detokenization with stop strings.

Text is produced by decoding a short window of tokens twice, with and without the newest tokens,
and taking the difference: the window's first tokens give the decoder context (leading spaces,
byte merges). While the newest text ends in U+FFFD the tokens so far end inside a multi-byte
character, so nothing is emitted until a later token completes it (or the request ends).

Stop strings: a stop string counts only when it ends in the newest token's text (as vLLM's: text
already searched holds none); of those that do, the first in the request's list wins, and the text
is cut before it, or after it with `include_stop_str_in_output` (which then finishes the request
with "stop"). No stop string is looked for while `check_stop` is off (the text of the first
min_tokens tokens: one that starts there and ends later is found). While streaming, a tail that
could still grow into a stop string is held back and only released when it cannot, or when the
request finishes for another reason: so a stop that ends in later text never starts in text sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

# Prompt tokens kept in front of the output as decoding context.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, decode: Decode, prompt_token_ids: Sequence[int] = (), stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = [s for s in stop if s]
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        self.check_stop = True
        self.decoded = ""  # all output text decoded so far (may include a held-back tail)
        self.emitted = 0  # characters of `decoded` already handed out
        self.stopped = False
        self.stop_str: str | None = None  # the stop string that stopped it (vLLM's stop_reason)
        self._held = 0  # the held-back tail's length when it was last looked for (_partial_stop_len) ...
        self._held_at = 0  # ... and len(decoded) then

    @property
    def text(self) -> str:
        """The text handed out so far."""
        return self.decoded[:self.emitted]

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the text that may be emitted now."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # mid-character, or a token without text yet
        self._append(new_text[len(prefix_text):])
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._release()

    def finish(self) -> str:
        """The request ends: decode what is pending (incomplete characters included) and release
        any held-back tail."""
        if self.stopped:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text):
            self._append(new_text[len(prefix_text):])
            self._prefix_offset = self._read_offset = len(self._ids)
        if self.stopped:
            return self._release()
        out = self.decoded[self.emitted:]
        self.emitted = len(self.decoded)
        return out

    def _append(self, piece: str) -> None:
        old_len = len(self.decoded)
        self.decoded += piece
        if not self._stop or not self.check_stop:
            return
        # As vLLM's check_stop_strings: a stop string must end in the new text (text searched before, or not
        # searched while check_stop was off, holds none), and the first one in the request's list that does wins
        for s in self._stop:
            i = self.decoded.find(s, max(0, old_len - len(s) + 1))
            if i >= 0:
                self.decoded = self.decoded[:i + len(s) if self._include_stop else i]
                self.stop_str = s
                self.stopped = True
                return

    def _release(self) -> str:
        end = len(self.decoded)
        if not self.stopped:
            end -= self._partial_stop_len()
        out = self.decoded[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text (shorter than the longest stop string) that is a prefix of a
        stop string. Such a tail, less the characters added since the last look, was such a tail then (a prefix
        of a prefix): so no tail longer than the last one plus those characters is looked at. Each look costs the
        stop strings times the characters added plus those the held-back tail lost, not times the longest stop
        string (256 stop strings of 4,096 characters took ~50 ms a token on the engine thread)."""
        text = self.decoded
        longest = min(self._max_stop_len - 1, len(text), self._held + len(text) - self._held_at)
        held = next((n for n in range(longest, 0, -1) if any(s.startswith(text[-n:]) for s in self._stop)), 0)
        self._held, self._held_at = held, len(text)
        return held
