"""PD: the decode continues from the token the prefill already sampled.

A prefill leg computes the whole prompt and samples the first output token. When the proxy asks for
it (`kv_transfer_params.return_first_token`), the prefill puts that token (and its logprobs) into its
signed answer (`first_token_ids`, `first_token_logprobs`: covered by the HMAC of params.py, so a
client cannot inject output). A decode that gets them:

- takes the token as already generated: it goes through the same detokenizer, stop rules, grammar
  and max_tokens counting as a token sampled here, and its output is handed out at admission, before
  the prompt's KV has arrived (the client's first token does not wait for the transfer);
- loads the KV of every prompt position, so its first step computes the first token's own KV and
  samples the token after it (no recomputed last prompt token);
- advances a seeded request's generator past the draw the prefill made for that token, so output
  position k uses the random stream colocated would use (sampler.py: one draw of V values per token
  of a non-greedy row).

A first token that ends the request (EOS, stop id or string, max_tokens) finishes it at admission:
its KV is never loaded. A decode request without these fields (vLLM's proxies, expired params)
recomputes the last prompt token as before.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pdlaunch.engine.outputs import TokenLogprob
from pdlaunch.engine.request import Request
from pdlaunch.kv_transfer.params import FIRST_TOKEN_IDS, FIRST_TOKEN_LOGPROBS, RETURN_FIRST_TOKEN, first_token_ids

__all__ = ["first_token_ids", "first_token_logprob", "skip_prefill_draw", "with_first_token"]

_LOGPROB_FLOOR = -9999.0  # JSON (and the signature) cannot carry -inf


def with_first_token(answer: dict[str, Any] | None, request: Request,
                     logprob: TokenLogprob | None) -> dict[str, Any] | None:
    """Prefill: the connector's answer plus the sampled token, when the prefill leg asked for it."""
    asked = bool((request.kv_transfer_params or {}).get(RETURN_FIRST_TOKEN))
    if answer is None or not answer.get("do_remote_prefill") or not asked or not request.output_token_ids:
        return answer
    answer = {**answer, FIRST_TOKEN_IDS: list(request.output_token_ids[:1])}
    if logprob is not None:
        answer[FIRST_TOKEN_LOGPROBS] = [{
            "logprob": _finite(logprob.logprob),
            "top": [{"token_id": t, "logprob": _finite(lp)} for t, lp in logprob.top.items()],
        }]
    return answer


def first_token_logprob(kv_transfer_params: dict[str, Any], token_id: int, wanted: int | None) -> TokenLogprob | None:
    """The prefill's logprobs of the first token, cut to the `wanted` top entries (None: not asked)."""
    if wanted is None:
        return None
    entries = kv_transfer_params.get(FIRST_TOKEN_LOGPROBS) or []
    if not entries:
        return None
    entry = entries[0]
    top = {t["token_id"]: t["logprob"] for t in entry.get("top", [])[:wanted]}
    return TokenLogprob(token_id, entry["logprob"], top)


def skip_prefill_draw(request: Request, vocab_size: int, device: torch.device) -> None:
    """Advance a seeded random request's generator by the one draw the prefill made for the first token."""
    if request.generator is not None and not request.params.greedy:
        torch.empty(vocab_size, device=device).exponential_(generator=request.generator)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _LOGPROB_FLOOR
