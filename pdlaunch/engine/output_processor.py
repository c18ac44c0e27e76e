"""From sampled tokens to RequestOutputs: detokenization and the stop rules of each request.

Stop order for a new token: a stop token id or (unless ignore_eos) an EOS id finishes with "stop"
(its id is returned, its text only with include_stop_str_in_output); a stop string in the text
finishes with "stop" (text cut before it, or after it with include_stop_str_in_output); the stop token id
or stop string is the request's stop_reason (vLLM's; an EOS leaves it None); otherwise
max_tokens or max_model_len finishes with "length". Before min_tokens tokens are out, no stop id finishes a
request (the sampler also holds EOS and stop ids back until then), and, as in vLLM, a stop string must end
in the text of a later token than those min_tokens.
Text is decoded with the request's skip_special_tokens.

Structured output, as vLLM's: a grammar's last token does not end the request; the grammar then allows nothing but
EOS, the sampler takes that EOS (min_tokens does not hold it back: the grammar's end ends the output, before
min_tokens too) and the EOS finishes it above, counted as an output token (usage, logprobs) and with
stop_reason None. With ignore_eos the grammar is over once its EOS is out: what follows is unconstrained.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from pydantic import JsonValue

from pdlaunch.engine.detokenizer import IncrementalDetokenizer
from pdlaunch.engine.grammar_limits import is_limit_error
from pdlaunch.engine.outputs import RequestOutput, TokenLogprob
from pdlaunch.engine.request import Request
from pdlaunch.engine.sampler import NO_TOKEN, SampleRow
from pdlaunch.engine.structured_output import GrammarBackend, StructuredOutput, advance
from pdlaunch.errors import EngineError

if TYPE_CHECKING:
    from llguidance import LLMatcher


@dataclass
class TrackedRequest:
    request: Request
    detokenizer: IncrementalDetokenizer
    stop_token_ids: frozenset[int]
    matcher: LLMatcher | None = None  # structured output: the grammar's state after the output so far


class Appended(NamedTuple):
    """What one sampled token did: text that may be emitted now, the finish reason (None: goes on), and
    the error (and its HTTP status) of a request it finished with "error"."""

    text: str
    reason: str | None
    error: str | None = None
    error_status: int = 500
    error_param: str | None = None  # the request field the error is about, when it is one


class OutputProcessor:
    def __init__(self, decode: Callable[..., str], eos_token_ids: Sequence[int], max_model_len: int,
                 grammars: GrammarBackend | None = None) -> None:
        self.decode = decode
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.grammars = grammars
        self.tracked: dict[str, TrackedRequest] = {}

    def grammar_matcher(self, spec: StructuredOutput) -> LLMatcher:
        """A new matcher of `spec` (any thread); EngineError naming the field when it cannot be built."""
        if self.grammars is None:
            raise EngineError("structured output needs the engine's tokenizer", field=spec.field)
        return self.grammars.matcher(spec)

    def add(self, request: Request, matcher: LLMatcher | None = None) -> None:
        """Track a new request; its grammar's `matcher` when one was built for it (off the engine thread), else
        built here. EngineError (naming the field) when its grammar cannot be built."""
        params = request.params
        if params.structured_output is None:
            matcher = None
        else:
            if matcher is None:
                matcher = self.grammar_matcher(params.structured_output)
            for token_id in request.output_token_ids:  # a request that already has output replays it
                advance(matcher, token_id)
        decode = functools.partial(self.decode, skip_special_tokens=params.skip_special_tokens,
                                   spaces_between_special_tokens=params.spaces_between_special_tokens)
        detokenizer = IncrementalDetokenizer(decode, request.prompt_token_ids, params.stop,
                                             params.include_stop_str_in_output)
        self.tracked[request.request_id] = TrackedRequest(request, detokenizer, frozenset(params.stop_token_ids),
                                                          matcher)

    def sample_rows(self, requests: Sequence[Request]) -> list[SampleRow]:
        """What the sampler needs of each request, in order."""
        return [SampleRow(r.params, r.generator, r.prompt_token_ids, r.output_token_ids,
                          self.tracked[r.request_id].matcher) for r in requests]

    def pop(self, request_id: str) -> TrackedRequest | None:
        return self.tracked.pop(request_id, None)

    def append_token(self, request: Request, token_id: int) -> Appended:
        """Add a sampled token. NO_TOKEN (the request's constraints allowed none) or a token its grammar rejects
        (one not sampled under it here: a PD decode continues from the prefill's token) finishes the request with
        "error" (400) and no text for that token."""
        tracked = self.tracked[request.request_id]
        params = request.params
        if token_id == NO_TOKEN:
            return Appended("", "error", f"no token may follow the {len(request.output_token_ids)} output tokens: "
                            "the request's constraints (structured output, allowed_token_ids, bad_words, min_tokens "
                            "holding back EOS and stop_token_ids) exclude every token", 400)
        # A complete grammar allowed nothing but EOS (the sampler let it through min_tokens): that EOS is an output
        # token like any other and ends the request even before min_tokens, as vLLM's
        complete = tracked.matcher is not None and tracked.matcher.is_stopped() and not tracked.matcher.is_error()
        request.append_output_token(token_id)
        if tracked.matcher is not None:
            advance(tracked.matcher, token_id)  # a complete grammar takes its EOS; any other token is an error
            if tracked.matcher.is_error():
                return self._grammar_error(request, tracked.matcher, token_id)
        new_text = ""
        reason = None
        may_stop = complete or len(request.output_token_ids) >= params.min_tokens
        # vLLM's detokenizer: the text of the first min_tokens tokens is no stop string (one may start there and end
        # later), as those tokens cannot be EOS or a stop id either (the sampler holds them back)
        tracked.detokenizer.check_stop = len(request.output_token_ids) > params.min_tokens
        if may_stop and (token_id in tracked.stop_token_ids
                         or (not params.ignore_eos and token_id in self.eos_token_ids)):
            reason = "stop"
            request.stop_reason = token_id if token_id in tracked.stop_token_ids else None
            if params.include_stop_str_in_output:
                new_text = tracked.detokenizer.add(token_id)
        else:
            new_text = tracked.detokenizer.add(token_id)
            if tracked.detokenizer.stopped:
                reason = "stop"
                request.stop_reason = tracked.detokenizer.stop_str
        if complete and reason is None:
            tracked.matcher = None  # ignore_eos: past its EOS the grammar is over, the output free (vLLM's terminated)
        if reason is None and (len(request.output_token_ids) >= params.max_tokens
                               or request.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            new_text += tracked.detokenizer.finish()
        return Appended(new_text, reason)

    @staticmethod
    def _grammar_error(request: Request, matcher: LLMatcher, token_id: int) -> Appended:
        """The 400 of a request whose grammar failed at its latest output token: past llguidance's limits (a pattern
        or schema too large for it, which the up-front probe did not reach), or a token it does not allow."""
        spec = request.params.structured_output
        field = spec.field if spec is not None else "structured_outputs"
        why = matcher.get_error().strip().splitlines()[0]  # the rest: the parser's state dump
        if is_limit_error(why):
            message = (f"{field}: the grammar is too large: it ran past llguidance's limits at output token "
                       f"{len(request.output_token_ids)} ({why}); use a smaller pattern, schema or choice list")
        else:
            message = f"{field}: the grammar rejected output token {token_id} ({why})"
        return Appended("", "error", message, 400, field)

    def output(self, request_id: str, new_token_ids: list[int], new_text: str,
               new_logprobs: list[TokenLogprob] | None = None,
               kv_transfer_params: dict[str, JsonValue] | None = None) -> RequestOutput:
        """The RequestOutput of a tracked request; a finished request stops being tracked."""
        tracked = self.tracked[request_id]
        r = tracked.request
        if r.is_finished:
            del self.tracked[request_id]
        return RequestOutput(
            request_id=r.request_id,
            new_token_ids=new_token_ids,
            new_text=new_text,
            output_token_ids=list(r.output_token_ids),
            text=tracked.detokenizer.text,
            finished=r.is_finished,
            finish_reason=r.finish_reason,
            stop_reason=r.stop_reason if r.is_finished else None,
            error=r.error,
            error_status=r.error_status,
            error_param=r.error_param,
            new_logprobs=new_logprobs,
            num_prompt_tokens=r.num_prompt_tokens,
            num_cached_tokens=r.num_cached_tokens,
            num_external_tokens=r.num_external_tokens,
            prompt_recomputed=r.prompt_recomputed,
            scheduled_at=r.scheduled_at,
            num_preemptions=r.num_preemptions,
            kv_transfer_params=kv_transfer_params,
        )
