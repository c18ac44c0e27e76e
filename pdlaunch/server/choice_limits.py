"""How many engine requests one OpenAI request may start, the refusal of a prompt that leaves no room, and an engine
refusal said in the names of the fields the client sent: the checks the instance (server/choices.py, and a prefill
for its decode leg: server/decode_limits.py) and the proxy (which splits a list of prompts) share."""

from __future__ import annotations

from pdlaunch.engine.context_limit import with_max_tokens, without_max_tokens
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


def as_sent(error: OpenAIError, prompt_field: str, limit_field: str, fills_context: bool) -> OpenAIError:
    """An engine refusal (which says prompt and max_tokens) in the names of the fields the client sent: a chat's
    prompt is its `messages` (`prompt_field`), its limit max_completion_tokens when it sent that one
    (`limit_field`); a request that named no limit (`fills_context`) is told to shorten its prompt."""
    message = error.message
    too_long = with_max_tokens(message, 0) is not None  # prompt + limit past max_model_len
    if too_long and limit_field != "max_tokens":
        message = message.replace(" + max_tokens (", f" + {limit_field} (").replace(
            "lower max_tokens", f"lower {limit_field}")
    message = message.replace("shorten the prompt", f"shorten the {prompt_field}")
    if too_long and fills_context:
        message = no_room_hint(message, prompt_field)
    param = prompt_field if error.param == "prompt" else error.param
    return OpenAIError(error.status, message, param=param, code=error.code)


def min_tokens_past_room(min_tokens: int, prompt_len: int, longest: int) -> OpenAIError | None:
    """The refusal of a request without an output limit whose min_tokens does not fit in the room its prompt leaves
    (a request may reach `longest` tokens, prompt and output), or None when it fits."""
    if min_tokens <= max(1, longest - prompt_len):
        return None
    return OpenAIError(400, f"min_tokens ({min_tokens}) does not fit: the prompt has {prompt_len} tokens and a request "
                            f"may reach {longest}", param="min_tokens")
