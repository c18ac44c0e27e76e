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

`skip_draws` is that advance for any number of tokens: a request's `seed_offset` (draws of its seed
made elsewhere: a migrated stream's continuation, proxy/migrate.py) is skipped when its generator is
made, on a prefill, a decode and a colocated instance alike; a decode given the first token skips
one draw more.

A first token that ends the request (EOS, stop id or string, max_tokens) finishes it at admission:
its KV is never loaded. A decode request without these fields (vLLM's proxies, expired params)
recomputes the last prompt token as before.
"""

from __future__ import annotations

import math

import torch

from pdlaunch.engine.outputs import TokenLogprob
from pdlaunch.engine.request import Request
from pdlaunch.kv_transfer.params import (
    FirstTokenLogprob,
    PrefillAnswer,
    RemoteDecodeRequest,
    TopLogprob,
    first_token_ids,
)

__all__ = ["first_token_ids", "first_token_logprob", "skip_draws", "skip_prefill_draw", "with_first_token"]

_LOGPROB_FLOOR = -9999.0  # JSON (and the signature) cannot carry -inf


def with_first_token(answer: PrefillAnswer | None, request: Request,
                     logprob: TokenLogprob | None) -> PrefillAnswer | None:
    """Prefill: the connector's answer plus the sampled token, when the prefill leg asked for it."""
    leg = request.kv_transfer_params
    asked = isinstance(leg, RemoteDecodeRequest) and leg.return_first_token
    if answer is None or not asked or not request.output_token_ids:
        return answer
    update: dict[str, object] = {"first_token_ids": list(request.output_token_ids[:1])}
    if logprob is not None:
        update["first_token_logprobs"] = [FirstTokenLogprob(
            logprob=_finite(logprob.logprob),
            top=[TopLogprob(token_id=t, logprob=_finite(lp)) for t, lp in logprob.top.items()],
        )]
    return answer.model_copy(update=update)


def first_token_logprob(params: PrefillAnswer, token_id: int, wanted: int | None) -> TokenLogprob | None:
    """The prefill's logprobs of the first token, cut to the `wanted` top entries (None: not asked)."""
    if wanted is None or not params.first_token_logprobs:
        return None
    entry = params.first_token_logprobs[0]
    return TokenLogprob(token_id, entry.logprob, {t.token_id: t.logprob for t in entry.top[:wanted]})


def skip_draws(request: Request, draws: int, vocab_size: int, device: torch.device) -> None:
    """Advance a seeded random request's generator (made on `device`) past the draws of `draws` tokens:
    one exponential_ of V values each, as the sampler draws them, into one reused buffer. On CUDA one
    draw of draws x V values would not leave the generator where `draws` separate draws do (Philox's
    offset advances by a launch-shaped amount per call), but every draw of V values advances it by the same
    amount: there the first draw measures it and the offset jumps past the rest (O(1) launches, so a large
    offset does not hold the engine thread). A CPU generator (mt19937) has no offset: it draws each.
    Greedy rows draw nothing."""
    generator = request.generator
    if generator is None or request.params.greedy or draws <= 0:
        return
    buffer = torch.empty(vocab_size, device=device)  # [V] float32, as the sampler's race
    if generator.device.type == "cuda":
        start = generator.get_offset()
        buffer.exponential_(generator=generator)
        generator.set_offset(start + draws * (generator.get_offset() - start))
        return
    for _ in range(draws):
        buffer.exponential_(generator=generator)


def skip_prefill_draw(request: Request, vocab_size: int, device: torch.device) -> None:
    """Advance a seeded random request's generator by the one draw the prefill made for the first token."""
    skip_draws(request, 1, vocab_size, device)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _LOGPROB_FLOOR
