"""A PD prefill leg refuses what its decode leg would refuse, before it computes the prompt.

The proxy's prefill leg asks for one token (proxy/translate.py), so the output limits the client set are the
decode's alone to check: prompt + max_tokens against max_model_len, and a request without a limit's min_tokens against
the room its prompt leaves. Without this the decode refused such a request only after the prefill had computed the
prompt's KV and held it for a decode leg that never loaded it, while the client waited for both (colocated, the same
request is refused before any compute, as in vLLM). The leg carries those limits as the client sent them
(`decode_limits`, request_fields.DecodeLimits); the prefill checks them once it has counted the prompt's tokens and
answers the 400 the decode would have, word for word (choice_limits.as_sent names the fields the client sent).
They are read on a prefill leg only (kv_transfer_params.do_remote_decode, server/choices.py): a client's own on any
other request, its decode leg's included (the proxy passes a client's fields on), describe no other leg and refuse
nothing.

Every other refusal of the decode leg is made before the prefill leg or by the prefill leg itself: the proxy
validates the client's whole body as an instance does (translate.parse_client_body: field types and ranges, n /
best_of / echo / min_tokens <= max_tokens, stream_options), and the prefill leg keeps every field the engine checks
against the model (the prompt's token ids, stop_token_ids, logit_bias, allowed_token_ids, seed_offset, structured
output, tools). What only the decode's own KV cache decides is left to it: a request needing more blocks than the
decode's cache has, and the room of a request without a limit when that cache holds fewer than max_model_len tokens
(the prefill checks that room against max_model_len, the most any decode of the deployment allows: it never refuses
what the decode would take).
"""

from __future__ import annotations

from collections.abc import Sequence

from pdlaunch.engine.context_limit import TOO_LONG_HINT, too_long_message
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.choice_limits import as_sent, min_tokens_past_room
from pdlaunch.server.request_fields import DEFAULT_MAX_TOKENS, DecodeLimits


def decode_leg_refusal(limits: DecodeLimits, chat: bool, ids: Sequence[int], max_model_len: int,
                       vocab_size: int) -> OpenAIError | None:
    """The 400 the decode leg of the prompt `ids` would answer for its output limits, or None. In the decode's order:
    a request without a limit has its min_tokens checked before the engine sees it (choices.py), a request with one
    its prompt + max_tokens after the engine's checks of the prompt's ids (engine_requests.add_request), which the
    prefill's engine makes as well, with the same 400: a prompt those refuse is left to them here."""
    named = chat and limits.max_completion_tokens is not None  # it sets the limit when max_tokens is sent too
    limit_field = "max_completion_tokens" if named else "max_tokens"
    limit = limits.max_completion_tokens if named else limits.max_tokens
    # No limit: a chat without either field, a completion whose max_tokens is null (without the field: 16).
    if limit is None and (chat or "max_tokens" in limits.model_fields_set):
        return min_tokens_past_room(limits.min_tokens or 0, len(ids), max_model_len)
    # A max_tokens of 0 is echo's (the proxy refused it without echo): the engine samples one token.
    max_tokens = max(1, limit if limit is not None else DEFAULT_MAX_TOKENS)
    if len(ids) + max_tokens <= max_model_len or not ids or not all(0 <= t < vocab_size for t in ids):
        return None  # the ids last: a pass over the prompt only for a request to refuse
    # The engine's refusal (engine_requests.add_request), as its server turns it into a 400 (engine_thread.py).
    error = OpenAIError(400, f"{too_long_message(len(ids), max_tokens, max_model_len)} ({TOO_LONG_HINT})",
                        param="prompt")
    return as_sent(error, "messages" if chat else "prompt", limit_field, fills_context=False)


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
