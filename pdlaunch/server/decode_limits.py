"""A PD prefill leg refuses what its decode leg would refuse, before it computes the prompt.

The proxy's prefill leg asks for one token (proxy/translate.py), so the output limits the client set are the
decode's alone to check: prompt + max_tokens against max_model_len, the blocks that needs against the decode's KV
cache, and a request without a limit's min_tokens against the room its prompt leaves. Without this the decode refused
such a request only after the prefill had computed the prompt's KV and held it for a decode leg that never loaded it,
while the client waited for both (colocated, the same request is refused before any compute, as in vLLM). The leg
carries those limits as the client sent them (`decode_limits`, request_fields.DecodeLimits), and the KV cache of the
decode the proxy chose, as that decode's /health reports it (`decode_limits.kv_cache`, engine/kv_capacity.py); the
prefill checks them once it has counted the prompt's tokens and answers the 400 the decode would have, word for word
(choice_limits.as_sent names the fields the client sent). They are read on a prefill leg only
(kv_transfer_params.do_remote_decode, server/choices.py): a client's own on any other request, its decode leg's
included (the proxy passes a client's fields on), describe no other leg and refuse nothing.

Every other refusal of the decode leg is made before the prefill leg or by the prefill leg itself: the proxy
validates the client's whole body as an instance does (translate.parse_client_body: field types and ranges, n /
best_of / echo / min_tokens <= max_tokens, stream_options), and the prefill leg keeps every field the engine checks
against the model (the prompt's token ids, stop_token_ids, logit_bias, allowed_token_ids, seed_offset, structured
output, tools). Without `kv_cache` (a decode whose /health the proxy has not read, or that reports none) the decode's
KV cache is left to it: the prefill checks the room of a request without a limit against max_model_len, the most any
decode of the deployment allows, so it never refuses what the decode would take.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdlaunch.engine.context_limit import TOO_LONG_HINT, too_long_message
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.choice_limits import as_sent, min_tokens_past_room
from pdlaunch.server.request_fields import DEFAULT_MAX_TOKENS, DecodeLimits


def decode_leg_refusal(limits: DecodeLimits, chat: bool, ids: Sequence[int], max_model_len: int,
                       vocab_size: int) -> OpenAIError | None:
    """The 400 the decode leg of the prompt `ids` would answer for its output limits or its KV cache's size, or None.
    In the decode's order: a request without a limit has its min_tokens checked before the engine sees it
    (choices.py), then the engine checks the prompt's ids, prompt + max_tokens against max_model_len, and the blocks
    that needs against its KV cache (engine_requests.add_request). The prefill's engine checks the ids as well, with
    the same 400: a prompt those refuse is left to it here."""
    named = chat and limits.max_completion_tokens is not None  # it sets the limit when max_tokens is sent too
    limit_field = "max_completion_tokens" if named else "max_tokens"
    limit = limits.max_completion_tokens if named else limits.max_tokens
    cache = limits.kv_cache  # the decode's, when the proxy knows it
    # No limit: a chat without either field, a completion whose max_tokens is null (without the field: 16). The
    # decode's max_tokens is then the room its prompt leaves of the longest request its cache takes (choices.py).
    fills_context = limit is None and (chat or "max_tokens" in limits.model_fields_set)
    if fills_context:
        longest = cache.longest(max_model_len) if cache is not None else max_model_len
        room_refusal = min_tokens_past_room(limits.min_tokens or 0, len(ids), longest)
        if room_refusal is not None:
            return room_refusal
        max_tokens = max(1, longest - len(ids))
    else:  # a max_tokens of 0 is echo's (the proxy refused it without echo): the engine samples one token
        max_tokens = max(1, limit if limit is not None else DEFAULT_MAX_TOKENS)
    total = len(ids) + max_tokens
    too_large = cache.refusal(total) if cache is not None and total <= max_model_len else None
    if total > max_model_len and not fills_context:
        # The engine's refusal, as its server turns it into a 400 (engine_thread.py).
        error = OpenAIError(400, f"{too_long_message(len(ids), max_tokens, max_model_len)} ({TOO_LONG_HINT})",
                            param="prompt")
    elif too_large is not None:  # needs more blocks than the decode's KV cache has in all
        error = OpenAIError(400, f"{too_large.message} ({too_large.hint})", param=too_large.field or "prompt")
    else:  # fits; or, without a limit, past max_model_len by its prompt alone: the prefill's one-token leg is too
        return None
    if not ids or not all(0 <= t < vocab_size for t in ids):
        return None  # the ids last: a pass over the prompt only for a request to refuse
    return as_sent(error, "messages" if chat else "prompt", limit_field, fills_context)


DECODE_LIMITS_REFUSAL = ("decode_limits is set by pdlaunch's PD proxy on a prefill leg (one with "
                         "kv_transfer_params.do_remote_decode: true) and describes no other request: remove it "
                         "(max_tokens, max_completion_tokens and min_tokens set this request's own limits)")


def check_decode_leg(limits: DecodeLimits | None, chat: bool, prompts: Sequence[Sequence[int]], max_model_len: int,
                     vocab_size: int) -> None:
    """Raise the decode leg's 400 (decode_leg_refusal) for the first of the prompts (token ids) it refuses; nothing
    without limits."""
    if limits is None:
        return
    for ids in prompts:
        refusal = decode_leg_refusal(limits, chat, ids, max_model_len, vocab_size)
        if refusal is not None:
            raise refusal
