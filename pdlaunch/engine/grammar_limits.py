"""Grammars past llguidance's resource limits, found before a request runs.

llguidance compiles a grammar's lexer lazily: `validate_grammar` and building a matcher succeed for
`a{1000000}`, and the limit is hit when a token is consumed (each step has a fixed lexer fuel: a regex
derivative that builds too many expressions stops it with "lexer error: too many expressions
constructed"); a `guided_choice` list of 2,000 or more strings fails at its first token too (a parser
row holds one item per choice, at most 2,000). The request then failed at its first output token with a
message that blamed that token.

`probe` runs a grammar's first steps over a tokenizer of the 256 single bytes: at each step every byte
the grammar allows is consumed (and rolled back), then the walk goes on along the lowest one. A limit hit
there is one an output reaching those bytes hits too (a model's multi-byte token spends one step's fuel on
more of them), so the HTTP side refuses the request with a 400 naming its field before anything runs.
A grammar that reaches a limit only deeper in its output still fails there; `is_limit_error` tells that
failure from a rejected token, so the message says the grammar is too large.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # llguidance is imported where a grammar is first checked
    from llguidance import LLTokenizer

PROBE_STEPS = 32  # bytes walked: <1 ms for a JSON schema of a few keys, ~5 ms for `.*` (255 bytes tried a step)
_BYTES = 256  # token ids 0..255: those bytes; 256: EOS
# Words of llguidance's errors that mean a resource limit, not a grammar that rejects what came:
# "lexer error: too many expressions constructed" / "too many states", "Current row has N items; max is M",
# fuel and size limits.
_LIMIT_WORDS = ("lexer error", "too many", "max is", "fuel", "limit")


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


def probe(grammar: str, steps: int = PROBE_STEPS) -> str | None:
    """The first line of the error llguidance hits in `grammar`'s first `steps` bytes, or None. A grammar the byte
    tokenizer cannot build (it names special tokens this tokenizer lacks) is not probed: None."""
    import llguidance
    import numpy as np

    matcher = llguidance.LLMatcher(_byte_tokenizer(), grammar, log_level=0)
    if matcher.is_error():
        return None
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
