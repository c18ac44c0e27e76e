"""Request fields that vLLM (or OpenAI) accepts and this server cannot honour yet.

Each is refused with a 400 naming it as soon as it asks for something, instead of being accepted
and ignored (a 200 with a wrong answer). A field sent at its neutral value (`"n": 1`,
`"echo": false`, `"tools": []`) asks for nothing and passes. Fields not listed here and not
modelled in request_fields.py are unknown to vLLM too: ignored as OpenAI clients expect, and named in a
warning (as vLLM logs "fields were present in the request but ignored"), once per field per process
so that a client repeating one cannot flood the log.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping

from pdlaunch.http import JsonValue
from pdlaunch.http.errors import OpenAIError

log = logging.getLogger(__name__)
MAX_WARNED_FIELDS = 1000  # distinct names remembered (and warned about) per process: the log stays bounded
_warned: set[str] = set()
_warned_lock = threading.Lock()

# field -> values that ask for nothing (None always does).
_COMMON: dict[str, tuple[JsonValue, ...]] = {
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "truncate_prompt_tokens": (),
    "guided_decoding_backend": ("auto", "guidance", "llguidance"),  # the one we run
    "guided_whitespace_pattern": (),
    "logits_processors": ([],),
    "return_tokens_as_token_ids": (False,),
    "priority": (0,),
    "cache_salt": (),
    "vllm_xargs": ({},),
    "prompt_embeds": (),
    "mm_processor_kwargs": ({},),
    "request_id": (),  # send X-Request-Id instead
    "store": (False,),
    "service_tier": ("auto", "default"),
    "logprob_token_ids": (),
    "thinking_token_budget": (-1,),  # vLLM's "unlimited", treated as not sent
    "repetition_detection": ({},),  # vLLM's RepetitionDetectionParams() detects nothing
    "watermarking": (False,),
    "truncation_side": ("left", "right"),  # applies only with truncate_prompt_tokens, refused above
    "routed_experts_prompt_start": (0,),
    "ec_transfer_params": ({},),
}
# Why a field above is refused, where its name does not say it, and what to send instead.
_WHY: dict[str, str] = {
    "logprob_token_ids": "logprobs here are the chosen token's and its top alternatives' (logprobs; chat: "
                         "top_logprobs), not those of ids you name",
    "thinking_token_budget": "no reasoning parser runs here, as vLLM refuses it without --reasoning-parser / "
                             "--reasoning-config; bound the whole answer with max_tokens",
    "repetition_detection": "no repetition detection runs here; end a repeating answer with max_tokens, stop or "
                            "repetition_penalty",
    "watermarking": "this server adds no watermark",
    "truncation_side": "this server does not truncate prompts (truncate_prompt_tokens is refused too)",
    "routed_experts_prompt_start": "this server returns no routed-expert data",
    "ec_transfer_params": "this server serves text models: there is no encoder cache to transfer",
    "media_io_kwargs": "this server serves text models: there is no media to load",
    "return_prompt_text": "the answer does not carry the rendered chat prompt",
}
COMPLETION_ONLY: dict[str, tuple[JsonValue, ...]] = {
    "suffix": ("",),
    "add_special_tokens": (True,),  # completion prompts are always encoded with special tokens
}
CHAT_ONLY: dict[str, tuple[JsonValue, ...]] = {
    "best_of": (1,),
    "echo": (False,),  # vLLM's chat echo (repeat the last message)
    "functions": ([],),
    "function_call": ("none",),
    "reasoning_effort": (),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "verbosity": (),
    "structural_tag": (),
    "chat_template": (),  # as newer vLLM without --trust-request-chat-template: the server's template applies
    "media_io_kwargs": ({},),
    "return_prompt_text": (False,),
}


def refuse_unsupported(body: Mapping[str, object], chat: bool) -> None:
    """400 naming the first field of `body` that asks for something we do not do."""
    table = {**_COMMON, **(CHAT_ONLY if chat else COMPLETION_ONLY)}
    for name, neutral in table.items():
        value = body.get(name)
        if value is None or any(value == v and type(value) is type(v) for v in neutral):
            continue
        instead = f" or send {' or '.join(json_short(v) for v in neutral)}" if neutral else ""
        why = f": {_WHY[name]}" if name in _WHY else ""
        raise OpenAIError(400, f"{name} is not supported by this server (got {json_short(value)}){why}; "
                               f"leave it out{instead}", param=name, code="unsupported_parameter")


def json_short(value: object) -> str:
    """A client's value as it sent it (JSON), cut to a readable length."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def warn_ignored(body: Mapping[str, object], known: Iterable[str], chat: bool, within: str = "") -> list[str]:
    """Log a warning naming the fields of `body` that are neither modelled (`known`) nor refused here,
    each the first time a request carries it. Returns the fields it warned about now. `within`: the field
    `body` is the value of (`stream_options`), whose keys are named under it and refused by nothing here."""
    table = {} if within else {**_COMMON, **(CHAT_ONLY if chat else COMPLETION_ONLY)}
    modelled = set(known)
    unknown = [f"{within}.{k}" if within else k for k in body if k not in table and k not in modelled]
    with _warned_lock:
        new = [k for k in unknown if k not in _warned and len(_warned) < MAX_WARNED_FIELDS]
        _warned.update(new)
    if new:
        log.warning("The following fields were present in the request but ignored: %s",
                    ", ".join(_short(k) for k in new))
    return new
