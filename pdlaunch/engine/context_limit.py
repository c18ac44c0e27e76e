"""The "prompt + max_tokens exceeds max_model_len" refusal, written here once so that the PD proxy
can restate it with the client's max_tokens: the prefill leg asks for one token, and the client must
not read that 1 back as if it were its own limit (issue 33).
"""

from __future__ import annotations

import re

TOO_LONG_HINT = "shorten the prompt or lower max_tokens"  # the refusal's fix, as the engine adds it to the message
_TOO_LONG = re.compile(r"prompt \((\d+) tokens\) \+ max_tokens \((\d+)\) = (\d+) exceeds max_model_len (\d+)")


def too_long_message(prompt_len: int, max_tokens: int, max_model_len: int) -> str:
    return (f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} exceeds "
            f"max_model_len {max_model_len}")


def with_max_tokens(message: str, max_tokens: int) -> str | None:
    """`message` restated for a request of `max_tokens`, or None when it is not this refusal."""
    match = _TOO_LONG.search(message)
    if match is None:
        return None
    prompt_len, max_model_len = int(match[1]), int(match[4])
    return message[:match.start()] + too_long_message(prompt_len, max_tokens, max_model_len) + message[match.end():]


def without_max_tokens(message: str, prompt_field: str) -> str | None:
    """`message` restated for a request that named no output limit (its max_tokens was the room its prompt left, at
    least 1): "<prompt_field> (N tokens) leave(s) no room for an answer within max_model_len M: shorten the
    <prompt_field>", with no max_tokens the client never sent; None when it is not this refusal."""
    match = _TOO_LONG.search(message)
    if match is None:
        return None
    verb = "leave" if prompt_field == "messages" else "leaves"
    return (f"the {prompt_field} ({match[1]} tokens) {verb} no room for an answer within max_model_len {match[4]}: "
            f"shorten the {prompt_field}")
