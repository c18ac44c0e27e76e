"""A migrated stream's continuation: which requests can be continued from token ids, and the request that does.

A streamed request is continued by recompute: another decode gets a /v1/completions request whose prompt
is the prompt's ids + the generated ids whose text the client already has, with max_tokens (and
min_tokens) reduced by their number. A seeded sampled stream carries `seed_offset` = the client's own (if
any) + the generated ids in its prompt, so its generator skips the draws those tokens took and draws the
rest as the uninterrupted run would (engine/first_token.py skip_draws).

Not migrated (the stream ends with the error event, as without migration): requests whose output
depends on state the continuation cannot rebuild from token ids: stop strings (one may span the
migration point), tools (tool_choice "none" aside: its output is plain content) and structured outputs (parser
and grammar state), presence / frequency penalties and bad_words (the engine counts and matches them over the
output only, and the output before the cut is the continuation's prompt), logprobs (`logprobs: 0` too: the
chosen tokens' logprobs), several choices (`n` / `best_of` > 1, or a list of prompts, which only colocated
instances get whole), echo. A repetition penalty goes on: it counts prompt and output tokens alike.
"""

from __future__ import annotations

from pdlaunch.engine.outputs import SAMPLING_EPS
from pdlaunch.proxy.bodies import Body, JsonObject, int_of, several_prompts, token_limit
from pdlaunch.server.request_fields import DEFAULT_MAX_TOKENS

# Fields copied into a continuation: sampling that depends only on the prompt + output token ids.
# include_stop_str_in_output: the text of a stop token id (or EOS) that ends the continuation.
_CONTINUED_FIELDS = ("model", "user", "temperature", "top_p", "top_k", "seed", "min_p", "stop_token_ids",
                     "ignore_eos", "logit_bias", "allowed_token_ids", "repetition_penalty",
                     "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
                     "stream_options")


def not_migratable(body: Body, chat: bool) -> str | None:
    """The field (module doc) that keeps a streamed request from being continued from token ids, or None."""
    if body.get("stop"):
        return "stop"  # a stop string may span the migration point
    # tool_choice "none": the tools only reach the template (the prompt's ids); the output is plain content, never
    # parsed nor held back (server/tool_calls.py), and goes on as any chat's
    if chat and body.get("tool_choice") != "none" and (body.get("tools") or body.get("tool_choice") is not None):
        return "tools" if body.get("tools") else "tool_choice"
    if body.get("response_format") not in (None, {"type": "text"}):  # {"type": "text"}: OpenAI's default, no grammar
        return "response_format"
    constrained = [k for k in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
                   if body.get(k) is not None]
    if constrained:
        return constrained[0]
    penalized = [k for k in ("presence_penalty", "frequency_penalty") if body.get(k) not in (None, 0, 0.0)]
    if penalized:
        return penalized[0]
    if body.get("bad_words"):
        return "bad_words"
    logprobs = body.get("logprobs")  # completions' 0 asks for the chosen tokens' logprobs (0 == False in Python)
    if logprobs is not None and logprobs is not False:  # chat's top_logprobs asks for nothing without it
        return "logprobs"
    several = [k for k in ("n", "best_of") if body.get(k) not in (None, 1)] + (["echo"] if body.get("echo") else [])
    if not chat and several_prompts(body.get("prompt")):  # a choice per prompt (colocated: sent whole)
        several.append("prompt")
    return several[0] if several else None


def max_tokens_of(body: Body, chat: bool) -> int | None:
    """The client's output limit; None when it names none that applies (a chat request without one, a
    completion's null max_tokens): the instance then fills the context (server/request_fields.fills_context)."""
    limit = int_of(token_limit(body, chat, "max_completion_tokens", "max_tokens"))
    if limit is not None:
        return limit
    return None if chat or "max_tokens" in body else DEFAULT_MAX_TOKENS


def continuation_body(body: Body, chat: bool, token_ids: list[int], generated: int) -> JsonObject:
    """The /v1/completions request that goes on from `token_ids` (prompt + `generated` output ids)."""
    leg = {k: body[k] for k in _CONTINUED_FIELDS if k in body}
    limit = max_tokens_of(body, chat)
    # null: the continuation, a completion, fills the context as the client's request would have
    leg.update(prompt=list(token_ids), max_tokens=None if limit is None else max(1, limit - generated), stream=True,
               return_token_ids=True)
    min_tokens = int_of(body.get("min_tokens"))  # the instances read no other name (min_completion_tokens is none)
    if min_tokens:
        leg["min_tokens"] = max(0, min_tokens - generated)
    # token k was the seed's draw seed_offset + k (sampler.py); seed -1 is vLLM's "no seed" (engine/outputs.py)
    if body.get("seed") not in (None, -1) and not _greedy(body):
        leg["seed_offset"] = (int_of(body.get("seed_offset")) or 0) + generated
    return leg


def _greedy(body: Body) -> bool:
    """Whether the instance samples `body` greedily (engine/outputs.py SamplingParams.greedy: a temperature below
    SAMPLING_EPS, absent = 1.0, or top_k 1): it draws nothing, and takes no seed_offset."""
    temperature = body.get("temperature")
    cold = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature < SAMPLING_EPS
    return cold or int_of(body.get("top_k")) == 1
