"""A list of prompts in /v1/completions through PD: one PD request per prompt, answers merged.

A prefill computes (and holds) the KV of one prompt per request, and a decode loads one prompt's KV
per kv_transfer_params, so the proxy splits the list: each prompt gets its own prefill leg and KV
transfer, all running concurrently, and the answers are merged into the one a colocated instance
gives. Choices are indexed as OpenAI does (prompt p, sample i -> p * n + i); usage is summed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.sse import DONE, ClosingStreamingResponse, SSEParser, sse_event
from pdlaunch.server.choices import MAX_CHOICES

T = TypeVar("T")
_USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


def split_prompts(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """One completions body per prompt, or None when `body` has one prompt (a string, a list of token
    ids, or a list of one)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, list) or len(prompt) < 2 or all(isinstance(x, int) for x in prompt):
        return None
    samples = max(body.get("n") or 1, body.get("best_of") or 1)
    if len(prompt) * samples > MAX_CHOICES:
        raise OpenAIError(400, f"{len(prompt)} prompts x {samples} samples exceed {MAX_CHOICES} choices",
                          param="prompt")
    return [{**body, "prompt": p} for p in prompt]


def merge_answers(answers: list[dict[str, Any]], n: int, response_id: str) -> dict[str, Any]:
    """The whole answers of each prompt's request (in prompt order) as one answer."""
    merged = {**answers[0], "id": response_id, "choices": []}
    for p, answer in enumerate(answers):
        merged["choices"] += [{**c, "index": p * n + c.get("index", 0)} for c in answer.get("choices", [])]
    usages = [a["usage"] for a in answers if isinstance(a.get("usage"), dict)]
    if usages:
        merged["usage"] = _sum_usage(usages)
    return merged


class MergedStream:
    """The SSE streams of each prompt's request as one: chunks forwarded as they come with their choice
    index moved to p * n + i, one usage chunk (summed) at the end, then [DONE]. An error event from any
    stream is forwarded and ends the whole stream."""

    def __init__(self, streams: list[ClosingStreamingResponse], n: int, response_id: str) -> None:
        self.streams, self.n, self.response_id = streams, n, response_id

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.streams), return_exceptions=True)

    async def events(self) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

        async def pump(p: int, body: AsyncIterable[Any]) -> None:
            parser = SSEParser()
            try:
                async for chunk in body:
                    for data in parser.feed(chunk if isinstance(chunk, bytes) else str(chunk).encode()):
                        await queue.put((p, data))
            finally:
                await queue.put((p, None))  # this stream ended

        pumps = [asyncio.ensure_future(pump(p, s.body_iterator)) for p, s in enumerate(self.streams)]
        usages: list[dict[str, Any]] = []
        usage_chunk: dict[str, Any] | None = None
        try:
            remaining = len(pumps)
            while remaining:
                p, data = await queue.get()
                if data is None:
                    remaining -= 1
                    continue
                if data == "[DONE]":
                    continue
                event = json.loads(data)
                if "error" in event:
                    yield sse_event(event)
                    return
                event["id"] = self.response_id
                if not event.get("choices") and isinstance(event.get("usage"), dict):
                    usages.append(event["usage"])
                    usage_chunk = event
                    continue
                event["choices"] = [{**c, "index": p * self.n + c.get("index", 0)} for c in event.get("choices", [])]
                yield sse_event(event)
            if usage_chunk is not None:
                yield sse_event({**usage_chunk, "usage": _sum_usage(usages)})
            yield DONE
        finally:
            for task in pumps:
                task.cancel()
            await self.close()


async def gather_legs(calls: Sequence[Awaitable[T]], on_failure: Callable[[list[T]], Awaitable[None]]) -> list[T]:
    """Run every prompt's request concurrently. The first failure cancels the others and hands the
    results already in to `on_failure` (to close their streams) before it is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await on_failure([t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None])
        raise


def _sum_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {k: sum(u.get(k) or 0 for u in usages) for k in _USAGE_COUNTS}
    cached = [u["prompt_tokens_details"].get("cached_tokens") or 0 for u in usages
              if isinstance(u.get("prompt_tokens_details"), dict)]
    if cached:
        total["prompt_tokens_details"] = {"cached_tokens": sum(cached)}
    return total
