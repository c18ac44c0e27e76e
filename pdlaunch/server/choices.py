"""Requests answered by several engine requests: n > 1, best_of, a list of prompts, echo.

Each choice is one engine request. For every prompt the first sample is submitted alone; the
other samples of that prompt follow once it produced its first token, so its prompt blocks are
computed (or, on a PD decode, loaded over the KV connector: only the first sample carries the
kv_transfer_params) and registered in the prefix cache: the later samples share those blocks and
compute only the partial last block (less than one block of tokens). The prompt's KV moves once.

Seeds: sample i of a seeded request uses seed + i (vLLM's rule), so every sample differs and the
whole answer is reproducible. best_of: best_of samples are generated and the n with the highest
cumulative logprob are returned (not streamable, as in vLLM). Choices are indexed as OpenAI does:
prompt p, sample i -> index p * n + i. echo (completions): the prompt's text precedes each
choice's text, and with logprobs the prompt's logprobs (engine/prompt_logprobs.py) precede its logprobs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pdlaunch.engine.outputs import RequestOutput, SamplingParams, TokenLogprob
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.sse import DONE, sse_event
from pdlaunch.server.engine_loop import Accepted, EngineLoop, RequestStream, StreamItem
from pdlaunch.server.prompts import Prompt, prompt_token_ids
from pdlaunch.server.responses import ResponseBuilder

MAX_CHOICES = 128  # engine requests one HTTP request may start (prompts x best_of)


@dataclass
class Choice:
    index: int
    prompt_index: int
    request_id: str
    params: SamplingParams
    builder: ResponseBuilder
    stream: RequestStream | None = None
    echo_text: str = ""


class MultiChoice:
    """One request's choices: submitting them, collecting or streaming their outputs."""

    def __init__(self, engine_loop: EngineLoop, prompts: Sequence[Prompt], params: SamplingParams, n: int, best_of: int,
                 make_builder: Callable[[], ResponseBuilder], client_id: str,
                 kv_transfer_params: dict[str, Any] | None) -> None:
        if len(prompts) * best_of > MAX_CHOICES:
            raise OpenAIError(400, f"{len(prompts)} prompts x {best_of} samples exceed {MAX_CHOICES} choices",
                              param="best_of" if best_of > n else "n")
        if kv_transfer_params and len(prompts) > 1:
            raise OpenAIError(400, "a list of prompts cannot share one kv_transfer_params; send one request per "
                                   "prompt", param="prompt")
        self.engine_loop, self.prompts, self.n, self.best_of = engine_loop, prompts, n, best_of
        self.kv_transfer_params = kv_transfer_params
        self.keep_logprobs = params.logprobs is not None
        self.prompt_ids: list[list[int]] = []
        sample_params = params if best_of == n or params.logprobs is not None else \
            params.model_copy(update={"logprobs": 0})  # best_of ranks by the chosen tokens' logprobs
        self.choices = [
            Choice(p * best_of + i, p, f"{client_id}-{uuid.uuid4().hex[:8]}-{p}-{i}", _seeded(sample_params, i),
                   make_builder())
            for p in range(len(prompts)) for i in range(best_of)]

    def abort_all(self) -> None:
        for choice in self.choices:
            self.engine_loop.abort(choice.request_id)

    async def start(self, echo: Callable[[int, list[int]], str] | None) -> None:
        """Tokenize, submit every choice (the first of each prompt first) and await their acceptance."""
        engine = self.engine_loop.engine
        ids = [await prompt_token_ids(engine.tokenizer, p, engine.max_model_len) for p in self.prompts]
        self.prompt_ids = ids
        firsts = [c for c in self.choices if c.index % self.best_of == 0]
        for c in firsts:
            c.stream = self.engine_loop.submit(c.request_id, ids[c.prompt_index], c.params, self.kv_transfer_params)
        for c in firsts:
            await self._accepted(c)
        # The first output of each first sample: its prompt KV is cached (or loaded) by then.
        await asyncio.gather(*(_peek(c.stream) for c in firsts if c.stream is not None))
        for c in self.choices:
            if c.stream is None:
                c.stream = self.engine_loop.submit(c.request_id, ids[c.prompt_index], c.params, None)
                await self._accepted(c)
        if echo is not None:
            for c in self.choices:
                c.echo_text = echo(c.prompt_index, ids[c.prompt_index])

    async def _accepted(self, choice: Choice) -> None:
        assert choice.stream is not None
        first = await choice.stream.queue.get()
        if not isinstance(first, Accepted):
            raise _error_of(first)
        choice.builder.num_prompt_tokens = first.num_prompt_tokens

    async def response(self) -> dict[str, Any]:
        async def collect(c: Choice) -> None:
            while True:
                out = _output(await c.stream.queue.get())  # type: ignore[union-attr]
                c.builder.add(out)
                if out.finished:
                    return

        await asyncio.gather(*(collect(c) for c in self.choices))
        kept = self._best()
        bodies = []
        for c in kept:
            if not self.keep_logprobs:
                c.builder.logprobs = None
            c.builder.text = c.echo_text + c.builder.text
            if c.echo_text and self.keep_logprobs and c.builder.prompt_logprobs is not None:
                # echo with logprobs: the prompt's tokens lead the choice's logprobs (vLLM's shape).
                first = TokenLogprob(self.prompt_ids[c.prompt_index][0], 0.0)
                prompt = [lp for lp in c.builder.prompt_logprobs[1:] if lp is not None]
                c.builder.logprobs = [first, *prompt, *(c.builder.logprobs or [])]
                c.builder.echo_logprobs = True
            bodies.append(c.builder.response())
        body = bodies[0]
        body["choices"] = [{**b["choices"][0], "index": i} for i, b in enumerate(bodies)]
        body["usage"] = self._usage([c.builder for c in self.choices])
        return body

    def _best(self) -> list[Choice]:
        """The n choices of each prompt to return: all of them, or best_of's top n by cumulative logprob."""
        kept = []
        for p in range(len(self.prompts)):
            group = [c for c in self.choices if c.prompt_index == p]
            if self.best_of > self.n:
                group = sorted(group, key=lambda c: -sum(lp.logprob for lp in c.builder.logprobs or []))[:self.n]
            kept.extend(group)
        return kept

    def _usage(self, builders: list[ResponseBuilder]) -> dict[str, Any]:
        """Prompt and cached tokens once per prompt, completion tokens of every sample (vLLM's accounting)."""
        prompt = sum(b.num_prompt_tokens for c, b in zip(self.choices, builders) if c.index % self.best_of == 0)
        completion = sum(b.num_output_tokens for b in builders)
        cached = sum(b.num_cached_tokens for c, b in zip(self.choices, builders) if c.index % self.best_of == 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def events(self, include_usage: bool) -> AsyncIterator[bytes]:
        """SSE chunks of every choice as they come (index set), then the usage chunk and [DONE]."""
        merged: asyncio.Queue[tuple[Choice, StreamItem]] = asyncio.Queue()

        async def pump(c: Choice) -> None:
            while True:
                item = await c.stream.queue.get()  # type: ignore[union-attr]
                await merged.put((c, item))
                if not isinstance(item, RequestOutput) or item.finished:
                    return

        pumps = [asyncio.ensure_future(pump(c)) for c in self.choices]
        try:
            remaining = len(self.choices)
            while remaining:
                c, item = await merged.get()
                try:
                    out = _output(item)
                except OpenAIError as exc:
                    yield sse_event(exc.body())
                    return
                if c.echo_text and (out.new_text or out.finished):
                    out.new_text, c.echo_text = c.echo_text + out.new_text, ""
                chunk = c.builder.chunk(out, final_usage=False)
                if chunk is not None:
                    chunk["choices"] = [{**ch, "index": c.index} for ch in chunk["choices"]]
                    yield sse_event(chunk)
                remaining -= out.finished
            if include_usage:
                usage = self.choices[0].builder.usage_chunk()
                usage["usage"] = self._usage([c.builder for c in self.choices])
                yield sse_event(usage)
            yield DONE
        finally:
            for task in pumps:
                task.cancel()
            self.abort_all()


def _seeded(params: SamplingParams, sample: int) -> SamplingParams:
    if params.seed is None or sample == 0:
        return params
    return params.model_copy(update={"seed": (params.seed + sample) % 2**64})


async def _peek(stream: RequestStream) -> None:
    """Wait for the stream's next item and put it back in front."""
    item = await stream.queue.get()
    rest = []
    while not stream.queue.empty():
        rest.append(stream.queue.get_nowait())
    for x in (item, *rest):
        stream.queue.put_nowait(x)


def _output(item: StreamItem) -> RequestOutput:
    if isinstance(item, RequestOutput) and not (item.finished and item.finish_reason == "error"):
        return item
    raise _error_of(item)


def _error_of(item: StreamItem) -> OpenAIError:
    if isinstance(item, OpenAIError):
        return item
    if isinstance(item, RequestOutput) and item.finish_reason == "error":
        return OpenAIError(item.error_status, item.error or "the engine failed the request", code="engine_error")
    return OpenAIError(500, f"unexpected {type(item).__name__} on a request's output queue")
