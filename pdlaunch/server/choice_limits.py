"""How many engine requests one OpenAI request may start, and the refusal of a prompt that leaves no room: the
checks the instance (server/choices.py) and the proxy (which splits a list of prompts) share."""

from __future__ import annotations

from pdlaunch.engine.context_limit import without_max_tokens
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.request_fields import MAX_CHOICES


def no_room_hint(message: str, prompt_field: str) -> str:
    """The "prompt + max_tokens exceeds max_model_len" refusal of a request that named no output limit (its
    max_tokens is the room its prompt leaves, at least 1), said without that max_tokens: its fix is a shorter
    prompt, not a lower limit the client never sent."""
    return without_max_tokens(message, prompt_field) or message


def check_choice_count(num_prompts: int, n: int, best_of: int) -> None:
    """400 when a request asks for more than MAX_CHOICES engine requests (prompts x samples), naming the field
    that multiplies them (the proxy splits a list of prompts and checks it with this too)."""
    if num_prompts * best_of <= MAX_CHOICES:
        return
    if best_of == 1:  # the prompts alone: no n to lower
        raise OpenAIError(400, f"{num_prompts} prompts exceed {MAX_CHOICES} per request; send the prompts in several "
                               "requests", param="prompt")
    field = "best_of" if best_of > n else "n"
    raise OpenAIError(400, f"{num_prompts} prompts x {best_of} samples ({field}) exceed {MAX_CHOICES} choices per "
                           f"request; lower {field} or send the prompts in several requests", param=field)
