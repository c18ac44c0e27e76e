"""How a decode leg is seen to fail, and the decode that takes it over.

A leg fails when its decode drops the connection, ends its stream without a final chunk, or is marked
stalled (its /health probe past proxy.health_timeout_seconds: instances.py) while another decode is ready to take
the leg over (with none, the leg waits for its own decode to go on). `unless_stalled` races a call
against its instance's stall; `leg_events` reads a stream's payloads and ends with a `Failure` when it
failed. `others` and `another` are the ready decodes it may go on on (migrate.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx

from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.shutdown_answer import stream_cut_body
from pdlaunch.http.sse import SSEParser
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.upstream import ChunkReader, Interrupted, Proxy, Upstream, stream_payloads

T = TypeVar("T")


@dataclass
class Failure:
    reason: str  # died | stalled
    message: str


class Stalled(Exception):
    def __init__(self, instance: Instance) -> None:
        super().__init__(instance.name)
        self.instance = instance


class ShutDown(Exception):
    """A decode answered 503 shutting_down (`error`): it is stopping and cut the leg, or refused it, before any of its
    answer was sent. The leg goes on on another decode, as when a decode drops the connection (migrate.py); `error`
    is the client's answer where no other decode may take it."""

    def __init__(self, instance: Instance, error: OpenAIError) -> None:
        super().__init__(instance.name)
        self.instance = instance
        self.error = error


async def unless_stalled(pool: InstancePool, instance: Instance, work: Awaitable[T],
                         discard: Callable[[T], Awaitable[None]] | None = None) -> T:
    """`work`'s result, or Stalled when `instance` is marked stalled first and another instance of its
    role is ready (then `work` is cancelled: its in-flight count ends). Cancelled itself (the client left,
    another prompt of the request failed), it cancels `work` too. Either way it `discard`s a result that came in
    as `work` was cancelled (asyncio.wait_for, as Proxy.open_stream awaits the headers, returns a result that came
    after its cancellation rather than raising): an open stream nobody will read would hold its in-flight count and
    its decode forever."""
    call = asyncio.ensure_future(work)
    stall = asyncio.ensure_future(instance.stalled.wait())
    try:
        await asyncio.wait({call, stall}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        await _cancel(call, discard)
        raise
    finally:
        stall.cancel()
    if call.done() or not others(pool, instance):  # no other decode: wait for this one
        return await call
    await _cancel(call, discard)
    raise Stalled(instance)


async def _cancel(call: asyncio.Future[T], discard: Callable[[T], Awaitable[None]] | None) -> None:
    """Cancel `call` and wait for its end; `discard` its result if one came all the same."""
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    if discard is not None and not call.cancelled() and call.exception() is None:
        await discard(call.result())


def others(pool: InstancePool, failed: Instance) -> list[Instance]:
    """Ready instances of `failed`'s role but `failed`."""
    return [i for i in pool.instances if i.role == failed.role and i.state == "ready" and i is not failed]


def another(pool: InstancePool, failed: Instance) -> Instance:
    """A ready instance of `failed`'s role other than it (only called when `others` has found one since the last
    await: the health probe may mark one down at any await; with none, the policy's 503 no_instance)."""
    return pool.policy.choose(failed.role, others(pool, failed))


async def leg_events(proxy: Proxy, upstream: Upstream, deadline: float) -> AsyncGenerator[str | Failure, None]:
    """`upstream`'s SSE payloads, then a Failure if it failed (dropped, or its instance stalled while another of its
    role was ready: with none, the stream has nowhere to go and is read on, as `unless_stalled` waits)."""
    instance, parser = upstream.instance, SSEParser()

    def heed(event: str) -> bool:
        return event != "stalled" or bool(others(proxy.pool, instance))

    reader = ChunkReader(upstream.response, deadline, heed, stalled=instance.stalled, stopping=proxy.stopping)
    try:
        while True:
            try:
                chunk = await reader.next()
            except Interrupted as stop:
                if stop.reason == "stopping":  # the drain at shutdown ran out: the stream ends, not migrated
                    yield json.dumps(stream_cut_body(), separators=(",", ":"))
                    return
                if stop.reason == "stalled":
                    yield Failure("stalled", f"{instance.name} ({instance.url}) stalled (no /health answer "
                                             f"within {proxy.pool.health_timeout_s:g}s)")
                    return
                raise proxy.timed_out() from None  # the request's deadline: its 504
            except (httpx.HTTPError, TimeoutError) as exc:
                proxy.failed(instance, exc)  # marks a dropped instance down
                yield Failure("died", f"{instance.name} ({instance.url}) failed mid-stream: "
                                      f"{type(exc).__name__}")
                return
            if chunk is None:
                return
            for data in stream_payloads(parser, chunk, instance):
                yield data
    finally:
        reader.close()
