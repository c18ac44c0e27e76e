"""Request fields that vLLM (or OpenAI) accepts and this server cannot honour yet.

Each is refused with a 400 naming it as soon as it asks for something, instead of being accepted
and ignored (a 200 with a wrong answer). A field sent at its neutral value (`"n": 1`,
`"echo": false`, `"tools": []`) asks for nothing and passes. Fields not listed here and not
modelled in protocol.py are unknown to vLLM too and are ignored as OpenAI clients expect.
"""

from __future__ import annotations

from typing import Any

from pdlaunch.http.errors import OpenAIError

# field -> values that ask for nothing (None always does).
_COMMON: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "truncate_prompt_tokens": (),
    "guided_decoding_backend": ("auto", "guidance", "llguidance"),  # the one we run
    "guided_whitespace_pattern": (),
    "logits_processors": ((), []),
    "return_tokens_as_token_ids": (False,),
    "priority": (0,),
    "cache_salt": (),
    "vllm_xargs": ({},),
    "prompt_embeds": (),
    "mm_processor_kwargs": ({},),
    "request_id": (),  # send X-Request-Id instead
    "store": (False,),
    "service_tier": ("auto", "default"),
}
COMPLETION_ONLY: dict[str, tuple[Any, ...]] = {
    "suffix": ("",),
    "add_special_tokens": (True,),  # completion prompts are always encoded with special tokens
}
CHAT_ONLY: dict[str, tuple[Any, ...]] = {
    "best_of": (1,),
    "echo": (False,),  # vLLM's chat echo (repeat the last message)
    "functions": ([],),
    "function_call": ("none",),
    "documents": ([],),
    "reasoning_effort": (),
    "include_reasoning": (False,),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "verbosity": (),
    "structural_tag": (),
    "chat_template": (),  # as newer vLLM without --trust-request-chat-template: the server's template applies
}


def refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    """400 naming the first field of `body` that asks for something we do not do."""
    table = {**_COMMON, **(CHAT_ONLY if chat else COMPLETION_ONLY)}
    for name, neutral in table.items():
        value = body.get(name)
        if value is None or any(value == v and type(value) is type(v) for v in neutral):
            continue
        raise OpenAIError(400, f"{name} is not supported by this server (got {_short(value)}); "
                               "leave it out", param=name, code="unsupported_parameter")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
