"""One request as the HTTP side sees it: an asyncio queue the engine thread feeds (engine_thread.py), first with
`Accepted` (or the error that ends it), then the engine's outputs."""

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
