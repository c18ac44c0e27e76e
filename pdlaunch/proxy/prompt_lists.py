"""A list of prompts in /v1/completions through PD: one PD request per prompt, answers merged.

A prefill computes (and holds) the KV of one prompt per request, and a decode loads one prompt's KV
per kv_transfer_params, so the proxy splits the list: each prompt gets its own prefill leg and KV
transfer, all running concurrently, and the answers are merged into the one a colocated instance
gives. Choices are indexed as OpenAI does (prompt p, sample i -> p * n + i); usage is summed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from pydantic import JsonValue

from pdlaunch.http.errors import error_body
from pdlaunch.http.sse import DONE, ClosingStreamingResponse, SSEParser, sse_data, sse_event
from pdlaunch.proxy.bodies import Body, JsonObject, as_object, int_of, objects
from pdlaunch.server.choice_limits import check_choice_count

log = logging.getLogger("pdlaunch.proxy")

T = TypeVar("T")
_USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")
# Events read ahead of the client, over all prompts. Beyond, each prompt's stream waits for the client (and its
# instance for the proxy), as the stream of one prompt does: a slow client never has the proxy hold whole answers.
READ_AHEAD_EVENTS = 64


def split_prompts(body: Body) -> list[JsonObject] | None:
    """One completions body per prompt, or None when `body` has one prompt (a string, a list of token
    ids, or a list of one)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, list) or len(prompt) < 2 or all(isinstance(x, int) for x in prompt):
        return None
    n = int_of(body.get("n")) or 1
    check_choice_count(len(prompt), n, max(n, int_of(body.get("best_of")) or 1))
    return [{**body, "prompt": p} for p in prompt]


def merge_answers(answers: list[JsonObject], n: int, response_id: str) -> JsonObject:
    """The whole answers of each prompt's request (in prompt order) as one answer."""
    choices: list[JsonValue] = []
    for p, answer in enumerate(answers):
        choices += [_reindexed(c, p * n) for c in objects(answer.get("choices"))]
    merged: JsonObject = {**answers[0], "id": response_id, "choices": choices}
    usages = [u for u in (as_object(a.get("usage")) for a in answers) if u is not None]
    if usages:
        merged["usage"] = _sum_usage(usages)
    return merged


class MergedStream:
    """The SSE streams of each prompt's request as one: chunks forwarded as they come with their choice
    index moved to p * n + i, one usage chunk (summed) at the end, then [DONE]. An error event from any
    stream is forwarded and ends the whole stream.

    Usage comes only in the usage chunk a client asked for (stream_options, as vLLM's streams): without it, the
    merged stream carries no usage either, as a colocated instance answering the whole list."""

    def __init__(self, streams: list[ClosingStreamingResponse], n: int, response_id: str) -> None:
        self.streams, self.n, self.response_id = streams, n, response_id

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.streams), return_exceptions=True)

    async def events(self) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue(READ_AHEAD_EVENTS)

        async def pump(p: int, body: AsyncIterable[str | bytes | memoryview]) -> None:
            parser = SSEParser()
            try:
                async for chunk in body:
                    for data in parser.feed(chunk if isinstance(chunk, bytes) else str(chunk).encode()):
                        await queue.put((p, data))
            except Exception as exc:  # noqa: BLE001 - the client's stream ends with it, not as if it were whole
                log.exception("the stream of prompt %d of %s failed", p, self.response_id)
                error = error_body(500, f"the stream of prompt {p} failed: {type(exc).__name__}: {exc}")
                await queue.put((p, json.dumps(error, separators=(",", ":"))))
            # This stream ended. Not when cancelled: the merged stream ended, and nobody reads the queue (waiting
            # for room in it, full, would keep this task, and the stream it holds, forever).
            await queue.put((p, None))

        pumps = [asyncio.ensure_future(pump(p, s.body_iterator)) for p, s in enumerate(self.streams)]
        usages: list[JsonObject] = []
        usage_chunk: JsonObject | None = None
        try:
            remaining = len(pumps)
            while remaining:
                p, data = await queue.get()
                if data is None:
                    remaining -= 1
                    continue
                if data == "[DONE]":
                    continue
                try:
                    parsed = json.loads(data)
                except ValueError:
                    parsed = None
                if not isinstance(parsed, dict):  # passed through as the stream of one prompt passes it
                    yield sse_data(data)
                    continue
                event: JsonObject = parsed
                if "error" in event:
                    yield sse_event(event)
                    return
                event["id"] = self.response_id
                usage = as_object(event.get("usage"))
                if not event.get("choices") and usage is not None:
                    usages.append(usage)
                    usage_chunk = event
                    continue
                event.pop("usage", None)
                event["choices"] = [_reindexed(c, p * self.n) for c in objects(event.get("choices"))]
                yield sse_event(event)
            if usage_chunk is not None:
                yield sse_event({**usage_chunk, "usage": _sum_usage(usages)})
            yield DONE
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)  # each ends at its next await
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


def _reindexed(choice: JsonObject, first: int) -> JsonObject:
    """`choice` of one prompt's answer at its place in the merged answer (the prompt's choices start at `first`)."""
    return {**choice, "index": first + (int_of(choice.get("index")) or 0)}


def _sum_usage(usages: list[JsonObject]) -> JsonObject:
    total: JsonObject = {k: sum(int_of(u.get(k)) or 0 for u in usages) for k in _USAGE_COUNTS}
    details = [as_object(u.get("prompt_tokens_details")) for u in usages]
    cached = [int_of(d.get("cached_tokens")) or 0 for d in details if d is not None]
    if cached:
        total["prompt_tokens_details"] = {"cached_tokens": sum(cached)}
    return total
