"""One request as the HTTP side sees it: an asyncio queue the engine thread feeds (engine_thread.py), first with
`Accepted` (or the error that ends it), then the engine's outputs; and how the HTTP side reads its items."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from pdlaunch.engine.outputs import RequestOutput
from pdlaunch.http.errors import OpenAIError


@dataclass
class Accepted:
    """First item of a request's queue once the engine took it."""

    num_prompt_tokens: int


StreamItem = Accepted | RequestOutput | OpenAIError


@dataclass
class RequestStream:
    """One request as the HTTP side sees it: an asyncio queue the engine thread feeds."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StreamItem] = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None
    # It asked for a remote prefill whose params had expired: the prompt is computed here (load_failure_policy
    # recompute), as when a load fails (RequestOutput.prompt_recomputed).
    prompt_recomputed: bool = False

    def put(self, item: StreamItem) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


async def peek(queue: asyncio.Queue[StreamItem]) -> None:
    """Wait for the queue's next item and put it back in front."""
    item = await queue.get()
    rest = []
    while not queue.empty():
        rest.append(queue.get_nowait())
    for x in (item, *rest):
        queue.put_nowait(x)


def output_of(item: StreamItem) -> RequestOutput:
    """`item` as an output; the error it carries (or ends the request with) raised."""
    if isinstance(item, RequestOutput) and not (item.finished and item.finish_reason == "error"):
        return item
    raise error_of(item)


def error_of(item: StreamItem) -> OpenAIError:
    if isinstance(item, OpenAIError):
        return item
    if isinstance(item, RequestOutput) and item.finish_reason == "error":
        return OpenAIError(item.error_status, item.error or "the engine failed the request", param=item.error_param,
                           code="engine_error")
    return OpenAIError(500, f"unexpected {type(item).__name__} on a request's output queue")
