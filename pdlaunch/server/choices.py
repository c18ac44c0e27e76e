"""An OpenAI generation request as the engine requests that answer it: its choices.

Each choice is one engine request; a plain request is one choice. n > 1, best_of and a list of prompts
make more: for every prompt the first sample is submitted alone; the other samples of that prompt follow
once it produced its first token, so its prompt blocks are computed (or, on a PD decode, loaded over the
KV connector: only the first sample carries the kv_transfer_params) and registered in the prefix cache:
the later samples share those blocks and compute only the partial last block (less than one block of
tokens). The prompt's KV moves once.

Seeds: sample i of a seeded request uses seed + i (vLLM's rule), so every sample differs and the
whole answer is reproducible. best_of: best_of samples are generated and the n with the highest
cumulative logprob are returned (not streamable, as in vLLM). Choices are indexed as OpenAI does:
prompt p, sample i -> index p * n + i. echo (completions): the prompt's text precedes each
choice's text, and with logprobs the prompt's logprobs (engine/prompt_logprobs.py) precede its logprobs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdlaunch.engine.detokenizer import Decode
from pdlaunch.engine.outputs import MAX_SEED, RequestOutput, SamplingParams, TokenLogprob
from pdlaunch.http import JsonObject
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.sse import DONE, sse_event
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.choice_limits import as_sent, check_choice_count, min_tokens_past_room
from pdlaunch.server.completion_request import CompletionRequest
from pdlaunch.server.decode_limits import DECODE_LIMITS_REFUSAL, check_decode_leg
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.prompts import Prompt, prompts_token_ids
from pdlaunch.server.request_metrics import RequestMetrics, SampleGroup
from pdlaunch.server.request_stream import Accepted, RequestStream, StreamItem, error_of, output_of, peek
from pdlaunch.server.responses import ResponseBuilder, mark_recomputed, usage_body

if TYPE_CHECKING:
    from pdlaunch.model.tokenizer import Tokenizer


@dataclass
class Choice:
    index: int
    prompt_index: int
    sample: int  # of its prompt: 0 goes first and carries the kv_transfer_params
    request_id: str
    params: SamplingParams
    builder: ResponseBuilder
    recorder: RequestMetrics
    stream: RequestStream | None = None
    echo_text: str = ""

    def queue(self) -> asyncio.Queue[StreamItem]:
        if self.stream is None:
            raise OpenAIError(500, f"choice {self.index} was never submitted")
        return self.stream.queue


class Choices:
    """One request's choices: submitting them, collecting or streaming their outputs."""

    def __init__(self, engine_loop: EngineLoop, body: CompletionRequest | ChatCompletionRequest,
                 prompts: Sequence[Prompt], client_id: str, model_name: str) -> None:
        completion = isinstance(body, CompletionRequest)
        n = body.n
        best_of = (body.best_of if isinstance(body, CompletionRequest) else None) or n
        check_choice_count(len(prompts), n, best_of)
        if body.kv_transfer_params and len(prompts) > 1:
            raise OpenAIError(400, "a list of prompts cannot share one kv_transfer_params; send one request per "
                                   "prompt", param="prompt")
        self.engine_loop, self.prompts, self.n, self.best_of = engine_loop, prompts, n, best_of
        self.kv_transfer_params = body.kv_transfer_params
        self.echo = isinstance(body, CompletionRequest) and body.echo
        self.echo_only = isinstance(body, CompletionRequest) and body.echo_only()
        # the fields the client sent, to name in the engine's refusals (which say prompt and max_tokens)
        self.completion = completion
        self.prompt_field = "prompt" if completion else "messages"
        self.limit_field = "max_completion_tokens" if isinstance(body, ChatCompletionRequest) and \
            body.max_completion_tokens is not None else "max_tokens"
        self.fills_context = body.fills_context()
        # A PD prefill leg's: its decode leg's limits (server/decode_limits.py). On any other request they would
        # describe no leg: refused, not ignored.
        prefill_leg = (body.kv_transfer_params or {}).get("do_remote_decode") is True
        if body.decode_limits is not None and not prefill_leg:
            raise OpenAIError(400, DECODE_LIMITS_REFUSAL, param="decode_limits")
        self.decode_limits = body.decode_limits
        self.prompt_ids: list[list[int]] = []
        params = body.sampling_params()
        calling = body.tool_calling() if isinstance(body, ChatCompletionRequest) else None
        if calling is not None and calling.mode != "none" and engine_loop.engine.tokenizer.special_tool_call_markers:
            # vLLM's hermes parser (its adjust_request): the output is decoded with its special tokens whenever tools
            # may be called, whatever the client sent, on a checkpoint that holds `<tool_call>` / `</tool_call>` as
            # special tokens (Hermes 2 Pro / 3 on Llama 3), which skipping would strip before the calls are parsed.
            # Every other checkpoint (Llama 3's llama3_json, Qwen's non-special markers) decodes as the client sent.
            params = params.model_copy(update={"skip_special_tokens": False})
        self.keep_logprobs = params.logprobs is not None
        sample_params = params if best_of == n or params.logprobs is not None else \
            params.model_copy(update={"logprobs": 0})  # best_of ranks by the chosen tokens' logprobs
        tokenizer = engine_loop.engine.tokenizer
        # A logprob's token is that token's own text, a special token's too whatever skip_special_tokens says: vLLM
        # decodes each logprob token alone with its tokenizer's default, which keeps them (a sampled EOS reads
        # "<|im_end|>", not "", and two special tokens among the top_logprobs are two keys, not one ""). text_offset
        # counts in the text decoded as the engine decodes it.
        skip_special, spaces = params.skip_special_tokens, params.spaces_between_special_tokens
        arrival = time.monotonic()
        self.choices: list[Choice] = []
        for p in range(len(prompts)):
            group = SampleGroup(n, best_of)  # vLLM's parent request: the prompt's samples
            for i in range(best_of):
                request_id = engine_request_id(client_id)
                builder = ResponseBuilder(
                    endpoint="completion" if completion else "chat", model=model_name, index=p * best_of + i,
                    return_token_ids=body.return_token_ids, tool_calling=calling,
                    detokenize=lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False),
                    decode=lambda ids: tokenizer.decode(ids, skip_special, spaces),
                    response_id=("cmpl-" if completion else "chatcmpl-") + client_id)
                recorder = RequestMetrics(request_id, builder.endpoint, arrival, group, params.max_tokens)
                self.choices.append(Choice(p * best_of + i, p, i, request_id, _seeded(sample_params, i), builder,
                                           recorder))

    def abort_all(self) -> None:
        for choice in self.choices:
            self.engine_loop.abort(choice.request_id)  # a no-op once the engine finished it

    def client_gone(self) -> None:
        """The client left: stop every choice, and free the KV a prefill holds for a decode leg that
        will not come (queued after the aborts: frees only what is held), or, on a decode leg not submitted yet,
        the KV its prefill holds for it (release_unsubmitted)."""
        self.abort_all()
        self.release_unsubmitted()
        if (self.kv_transfer_params or {}).get("do_remote_decode"):
            for choice in self.choices:
                if choice.sample == 0:
                    self.engine_loop.release_held_kv_soon(choice.request_id)

    def release_unsubmitted(self) -> None:
        """A PD decode leg ends before its first choice, which carries its kv_transfer_params, was submitted (the
        client left, or this server refused the request itself): nothing else tells its prefill, which would hold the
        prompt's KV until its lease's end. Once submitted, the engine thread or the engine tells it."""
        first = self.choices[0]  # one prompt when it has params: its first sample
        if first.stream is None:
            release_unsubmitted(self.engine_loop, first.request_id, self.kv_transfer_params, self.prompts,
                                self.prompt_ids)

    async def start(self) -> None:
        """Tokenize, submit every choice (the first of each prompt first) and await their acceptance."""
        engine = self.engine_loop.engine
        ids = await prompts_token_ids(engine.tokenizer, self.prompts, engine.max_model_len)
        self.prompt_ids = ids
        # Before any of them is submitted: a prefill computes nothing for a request its decode leg would refuse.
        if self.decode_limits is not None:  # a PD prefill leg's
            check_decode_leg(self.decode_limits, not self.completion, ids, engine.max_model_len, engine.vocab_size)
        if self.fills_context:
            for c in self.choices:
                self._fill_context(c, len(ids[c.prompt_index]), engine.longest_request)
        firsts = [c for c in self.choices if c.sample == 0]
        for c in firsts:
            c.stream = self.engine_loop.submit(c.request_id, ids[c.prompt_index], c.params, self.kv_transfer_params)
            c.builder.prompt_recomputed = c.stream.prompt_recomputed  # its params had expired
        for c in firsts:
            await self._accepted(c)
        rest = [c for c in self.choices if c.sample > 0]
        if rest:  # after the first output of each first sample: its prompt KV is cached (or loaded) by then
            await asyncio.gather(*(peek(c.queue()) for c in firsts))
        for c in rest:
            c.stream = self.engine_loop.submit(c.request_id, ids[c.prompt_index], c.params, None)
            await self._accepted(c)
        echoes = [echoed(engine.tokenizer, p, i, self.keep_logprobs) for p, i in zip(self.prompts, ids, strict=True)] \
            if self.echo else []
        for c in self.choices:
            c.builder.prompt_ids = ids[c.prompt_index]
            if c.builder.return_token_ids:
                c.builder.prompt_token_ids = ids[c.prompt_index]
            if echoes:
                c.echo_text, c.builder.echo_decode = echoes[c.prompt_index]
                c.builder.echo_chars = len(c.echo_text)

    @staticmethod
    def _fill_context(choice: Choice, prompt_len: int, longest: int) -> None:
        """A request without an output limit may generate up to max_model_len (fewer when the KV cache holds
        fewer: `longest`, engine.longest_request): its max_tokens is the room its prompt leaves (at least 1, so
        a prompt that fills the context is refused as too long)."""
        room = max(1, longest - prompt_len)
        refusal = min_tokens_past_room(choice.params.min_tokens, prompt_len, longest)
        if refusal is not None:
            raise refusal
        choice.params = choice.params.model_copy(update={"max_tokens": room})
        choice.recorder.max_tokens = room

    async def _accepted(self, choice: Choice) -> None:
        first = await choice.queue().get()
        if not isinstance(first, Accepted):
            raise self._as_sent(error_of(first))
        choice.builder.num_prompt_tokens = first.num_prompt_tokens
        choice.recorder.accepted(first.num_prompt_tokens)

    def _as_sent(self, error: OpenAIError) -> OpenAIError:
        """An engine refusal in the names of the fields the client sent: a chat's prompt is its `messages`, and
        its limit max_completion_tokens when it sent that one."""
        return as_sent(error, self.prompt_field, self.limit_field, self.fills_context)

    async def response(self) -> JsonObject:
        """The whole response once every choice finished."""
        async def collect(c: Choice) -> None:
            while True:
                out = output_of(recorded(c, await c.queue().get()))
                c.builder.add(out)
                if out.finished:
                    return

        await asyncio.gather(*(collect(c) for c in self.choices))
        if self.echo_only:  # the one token the engine sampled is not part of the answer
            for c in self.choices:
                c.builder.text, c.builder.output_token_ids, c.builder.num_output_tokens = "", [], 0
                c.builder.logprobs = [] if c.builder.logprobs is not None else None
                c.builder.finish_reason, c.builder.stop_reason = "length", None  # no stop ended the prompt
        kept = self._best()
        for c in kept:
            builder = c.builder
            if not self.keep_logprobs:
                builder.logprobs = None
            builder.text = c.echo_text + builder.text
            if self.echo and self.keep_logprobs and builder.prompt_logprobs is not None:
                # echo with logprobs: the prompt's tokens lead the choice's logprobs (vLLM's shape).
                first = TokenLogprob(self.prompt_ids[c.prompt_index][0], 0.0)
                prompt = [lp for lp in builder.prompt_logprobs[1:] if lp is not None]
                builder.logprobs = [first, *prompt, *(builder.logprobs or [])]
                builder.echo_logprobs = 1 + len(prompt)
        return self._marked(kept[0].builder.response([c.builder.choice(i) for i, c in enumerate(kept)], self._usage()))

    def _best(self) -> list[Choice]:
        """The n choices of each prompt to return: all of them, or best_of's top n by cumulative logprob."""
        kept = []
        for p in range(len(self.prompts)):
            group = [c for c in self.choices if c.prompt_index == p]
            if self.best_of > self.n:
                group = sorted(group, key=lambda c: -sum(lp.logprob for lp in c.builder.logprobs or []))[:self.n]
            kept.extend(group)
        return kept

    def _marked(self, body: JsonObject) -> JsonObject:
        """`body` (the whole answer or the usage chunk), saying so when a prompt was computed here rather than
        loaded from its remote prefill: its usage's cached tokens are this instance's (responses.PROMPT_RECOMPUTED)."""
        if any(c.builder.prompt_recomputed for c in self.choices if c.sample == 0):
            mark_recomputed(body)
        return body

    def _usage(self) -> JsonObject:
        """Prompt and cached tokens once per prompt, completion tokens of every sample (vLLM's accounting)."""
        firsts = [c.builder for c in self.choices if c.sample == 0]
        return usage_body(sum(b.num_prompt_tokens for b in firsts),
                          sum(c.builder.num_output_tokens for c in self.choices),
                          sum(b.num_cached_tokens for b in firsts))

    async def events(self, include_usage: bool) -> AsyncIterator[bytes]:
        """SSE chunks of every choice as they come, then the usage chunk when the client asked for it (only then is
        usage sent, as vLLM's), and [DONE]."""
        merged: asyncio.Queue[tuple[Choice, StreamItem]] = asyncio.Queue()

        async def pump(c: Choice) -> None:
            while True:
                item = await c.queue().get()
                await merged.put((c, item))
                if not isinstance(item, RequestOutput) or item.finished:
                    return

        pumps = [asyncio.ensure_future(pump(c)) for c in self.choices]
        try:
            remaining = len(self.choices)
            while remaining:
                c, item = await merged.get()
                try:
                    out = output_of(recorded(c, item))
                except OpenAIError as exc:
                    yield sse_event(exc.body())
                    return
                if c.echo_text and (out.new_text or out.finished):
                    out.new_text, c.echo_text = c.echo_text + out.new_text, ""
                for chunk in c.builder.chunks(out):
                    yield sse_event(chunk)
                remaining -= out.finished
            if include_usage:
                yield sse_event(self._marked(self.choices[0].builder.usage_chunk(self._usage())))
            yield DONE
        finally:
            for task in pumps:
                task.cancel()
            self.abort_all()


def echoed(tokenizer: Tokenizer, prompt: Prompt, ids: list[int], logprobs: bool) -> tuple[str, Decode]:
    """An echoed prompt's text (the string sent, or the text of the token ids sent, without special tokens) and the
    decode whose text of the prompt's `ids` is that text, in which the echoed tokens' text_offset counts (with
    `logprobs`; else the string is not decoded): the one that skips special tokens, as the tokenizer adds a BOS that a
    string does not hold, or, for a string that writes the special tokens' text itself, the one that keeps them (the
    output's own skip_special_tokens is no part of it)."""
    def skip(token_ids: Sequence[int]) -> str:
        return tokenizer.decode(token_ids)

    def keep(token_ids: Sequence[int]) -> str:
        return tokenizer.decode(token_ids, skip_special_tokens=False)

    if isinstance(prompt, str) and not logprobs:
        return prompt, skip
    skipped = skip(ids)
    text = prompt if isinstance(prompt, str) else skipped
    return text, keep if skipped != text and keep(ids) == text else skip


def engine_request_id(client_id: str) -> str:
    """An engine request id of the client's request `client_id` (its X-Request-Id): one per choice."""
    return f"{client_id}-{uuid.uuid4().hex[:8]}"


def release_unsubmitted(engine_loop: EngineLoop, request_id: str, kv_transfer_params: JsonObject | None,
                        prompts: Sequence[Prompt], prompt_ids: list[list[int]]) -> None:
    """A request ends before its first choice (engine request `request_id`) was submitted: when it is a PD decode
    leg, its prefill is told to drop the hold of its prompt's KV (EngineLoop.release_unloaded_soon). `prompt_ids`:
    its prompts' token ids when tokenized, else []: tokenized then only if the params need them."""
    params = kv_transfer_params
    if not params or params.get("do_remote_prefill") in (None, False) or len(prompts) != 1:
        return

    async def first_prompt_ids() -> list[int]:
        if prompt_ids:
            return prompt_ids[0]
        engine = engine_loop.engine
        return (await prompts_token_ids(engine.tokenizer, prompts, engine.max_model_len))[0]

    engine_loop.release_unloaded_soon(request_id, params, first_prompt_ids)


def recorded(choice: Choice, item: StreamItem) -> StreamItem:
    """`item`, its choice's series recorded first when it is an output: also the error output that ended the choice,
    which the caller raises (vLLM records a request's end histograms for an error as for a stop)."""
    if isinstance(item, RequestOutput):
        choice.recorder.output(item)
    return item


def _seeded(params: SamplingParams, sample: int) -> SamplingParams:
    if params.seed is None or sample == 0:
        return params
    seed = params.seed + sample  # a negative one stays so: torch takes it as seed + 2**64, as vLLM passes it on
    return params.model_copy(update={"seed": seed if seed <= MAX_SEED else seed - 2**64})
