"""Grammars past llguidance's resource limits, found before a request runs.

llguidance compiles a grammar's lexer lazily: `validate_grammar` and building a matcher succeed for
`a{1000000}`, and the limit is hit when a token is consumed (each step has a fixed lexer fuel: a regex
derivative that builds too many expressions stops it with "lexer error: too many expressions
constructed"); a `guided_choice` list of 2,000 or more strings fails at its first token too (a parser
row holds one item per choice, at most 2,000). The request then failed at its first output token with a
message that blamed that token.

`probe` runs a grammar's first steps over a tokenizer of the 256 single bytes (`byte_matcher`, the one compile
of a grammar on the HTTP side): at each step every byte the grammar allows is consumed (and rolled back), then the
walk goes on along the lowest one. A limit hit there is one an output reaching those bytes hits too (a model's
multi-byte token spends one step's fuel on more of them), so the HTTP side refuses the request with a 400 naming its
field before anything runs. A grammar that reaches a limit only deeper in its output still fails there;
`is_limit_error` tells that failure from a rejected token, so the message says the grammar is too large.

A grammar of more than 65,525 symbols (a JSON object of 13,000 optional keys) passes `validate_grammar`, and building
a matcher of it fails with "panic: assertion failed: grammar.symbols.len() < u16::MAX": a limit too (the engine's
matcher fails the same way, after as long a compile), found where the byte matcher is built (`build_error`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # llguidance is imported where a grammar is first checked
    from llguidance import LLMatcher, LLTokenizer

PROBE_STEPS = 32  # bytes walked: <1 ms for a JSON schema of a few keys, ~5 ms for `.*` (255 bytes tried a step)
_BYTES = 256  # token ids 0..255: those bytes; 256: EOS
# Words of llguidance's errors that mean a resource limit, not a grammar that rejects what came:
# "lexer error: too many expressions constructed" / "too many states", "Current row has N items; max is M",
# fuel and size limits, and the panic of a grammar of too many symbols.
_LIMIT_WORDS = ("lexer error", "too many", "max is", "fuel", "limit", "panic")


class _ByteTokenizer:
    """The duck-typed tokenizer llguidance.TokenizerWrapper reads: one token per byte, then EOS."""

    eos_token_id = _BYTES
    bos_token_id = None
    tokens = [bytes([b]) for b in range(_BYTES)] + [b"</s>"]
    special_token_ids = [_BYTES]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


@functools.cache
def _byte_tokenizer() -> LLTokenizer:
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()), slices=[])


def is_limit_error(error: str) -> bool:
    """Whether an llguidance error (its first line) is a resource limit the grammar ran past."""
    lowered = error.lower()
    return any(word in lowered for word in _LIMIT_WORDS)


def byte_matcher(grammar: str) -> LLMatcher:
    """`grammar` compiled over the 256 single bytes and EOS; in its error state (`is_error`) when it cannot be built:
    it is invalid, past a limit (`build_error`), or names tokens only a model's tokenizer has (special tokens, ids past
    256)."""
    import llguidance

    return llguidance.LLMatcher(_byte_tokenizer(), grammar, log_level=0)


def build_error(matcher: LLMatcher) -> str | None:
    """The first line of the error that stopped `matcher` being built when it is a limit (an invalid grammar or one
    naming other tokens than bytes: None; validate_grammar tells those apart)."""
    error = _first_line(matcher.get_error())
    return error if matcher.is_error() and error.startswith("panic") else None


def probe(matcher: LLMatcher, steps: int = PROBE_STEPS, opened: bytes = b"") -> str | None:
    """The first line of the error llguidance hits in the first `steps` bytes of a `byte_matcher`, or None; with
    `opened`, in the first `steps` bytes after those (a tool call's marker: the lowest bytes never write it)."""
    import numpy as np

    for byte in opened:
        if not matcher.consume_token(byte):
            return _first_line(matcher.get_error())
    for _ in range(steps):
        mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        if matcher.is_error():
            return _first_line(matcher.get_error())
        allowed = np.flatnonzero(np.unpackbits(mask, bitorder="little")[:_BYTES]).tolist()
        if not allowed:  # complete: nothing but EOS
            return None
        for byte in allowed:
            matcher.consume_token(byte)
            if matcher.is_error():
                return _first_line(matcher.get_error())
            matcher.rollback(1)
        matcher.consume_token(allowed[0])
    return None


def _first_line(error: str) -> str:
    lines = error.strip().splitlines()  # the rest: the parser's state dump
    return lines[0] if lines else "llguidance stopped without a message"
