"""Calls from the proxy to one instance: a JSON leg, or a streamed leg relayed event by event.

Every call runs under the request's deadline (proxy.request_timeout_seconds); a failed or vanished
instance becomes an OpenAI-format 502/503/504 (mid-stream: an SSE error event), never a hang, and an
instance that dropped the connection is marked down at once. A whole answer is read up to MAX_ANSWER_BYTES, an
error answer up to ERROR_MAX_BYTES and by the request's deadline: what an instance sends never grows the proxy's
memory without bound.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import httpx

from pdlaunch.http.answers import AnswerTooLarge, read_body
from pdlaunch.http.auth import internal_headers
from pdlaunch.http.errors import OpenAIError, error_body
from pdlaunch.http.limits import body_problem, parse_json_object
from pdlaunch.http.retry_later import retry_after_of
from pdlaunch.http.shutdown_answer import SHUTTING_DOWN_CODE, stop_before_deadline, stream_cut_body
from pdlaunch.http.sse import MAX_EVENT_BYTES, SSEEventTooLarge, SSEParser, sse_data, sse_event
from pdlaunch.proxy.bodies import JsonObject, as_object
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.load_board import IN_FLIGHT
from pdlaunch.proxy.metrics import ProxyMetrics
from pdlaunch.proxy.release import KVReleaser
from pdlaunch.proxy.translate import error_from_exception, error_from_response, is_connection_failure, is_shutting_down

CONNECT_TIMEOUT_S = 5.0
MAX_ANSWER_BYTES = MAX_EVENT_BYTES  # as one stream event: a long prompt's prompt_logprobs pass 100 MiB
ERROR_MAX_BYTES = 1 << 20  # an error answer is a message of a few lines
STOPPING = "it answered shutting_down: it is stopping"  # why an instance is marked down (`_answered`, `relay`)


@dataclass
class Upstream:
    """An open streaming answer of an instance; holds one in-flight count until closed."""

    instance: Instance
    response: httpx.Response
    closed: bool = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.instance.count(IN_FLIGHT, -1)
        await self.response.aclose()


class Proxy:
    """Routes client requests to instances. One per proxy process; the app's lifespan owns the client."""

    def __init__(self, pool: InstancePool, request_timeout_s: float, deployment_secret: str | None = None) -> None:
        self.pool = pool
        self.request_timeout_s = request_timeout_s
        self.metrics = ProxyMetrics(pool)
        self.client: httpx.AsyncClient | None = None
        # Every call to an instance carries the internal token: instances with an API key accept it.
        self.upstream_headers = internal_headers(deployment_secret)
        self.kv = KVReleaser(self.upstream_headers)
        self.stopping = asyncio.Event()  # set when the drain at shutdown ends: streams still open end with an event

    def begin_shutdown(self, drain_s: float) -> None:
        """Shutdown began (SIGTERM/Ctrl-C): streams may finish for `drain_s` seconds less a margin, then
        each one still running gets an SSE error event saying so and ends, before the server's own
        drain deadline cancels its task (a bare connection error for the client, a traceback in the log)."""
        stop_before_deadline(self.stopping, drain_s)

    def http(self) -> httpx.AsyncClient:
        if self.client is None:
            raise OpenAIError(503, "proxy is not started", code="not_ready")
        return self.client

    def remaining(self, deadline: float) -> float:
        """Seconds left before the request's `deadline`; a 504 when none are."""
        return self._timeout(deadline)

    def _timeout(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self.timed_out()
        return remaining

    def timed_out(self) -> OpenAIError:
        """The 504 of a request past its deadline."""
        return OpenAIError(504, f"request timed out after {self.request_timeout_s:g}s at the proxy "
                                "(proxy.request_timeout_seconds)", code="timeout")

    def failed(self, instance: Instance, exc: BaseException) -> OpenAIError:
        if is_connection_failure(exc):
            self.pool.mark_down(instance, f"{type(exc).__name__} during a request")
        return error_from_exception(instance, exc, self.request_timeout_s)

    async def post_json(self, instance: Instance, path: str, body: JsonObject, headers: dict[str, str],
                        deadline: float) -> JsonObject:
        remaining = self._timeout(deadline)
        with instance.lease():
            try:
                status, content, retry_after_s = await asyncio.wait_for(
                    self._post(instance.url + path, body, headers, remaining), remaining)
            except (httpx.HTTPError, TimeoutError) as exc:
                raise self.failed(instance, exc) from None
            except AnswerTooLarge as exc:
                raise OpenAIError(502, f"{instance.name} ({instance.url}) sent {exc}", code="instance_failed") from None
        if status != 200:
            raise self._answered(instance, status, content, retry_after_s)
        try:
            # As strict as a client's body: a NaN or a lone surrogate would fail the proxy's own JSON answer (a 500).
            return parse_json_object(content)
        except OpenAIError as exc:
            raise OpenAIError(502, f"{instance.name} ({instance.url}) answered 200 with a body that is not a valid "
                                   f"JSON object ({body_problem(exc)})",
                              code="instance_failed") from None

    async def _post(self, url: str, body: JsonObject, headers: dict[str, str],
                    remaining: float) -> tuple[int, bytes, int | None]:
        """(status, body, the answer's Retry-After in seconds if it has a valid one)."""
        timeout = httpx.Timeout(remaining, connect=min(CONNECT_TIMEOUT_S, remaining))
        async with self.http().stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
            if response.status_code != 200:
                return response.status_code, await _error_body(response), retry_after_of(response.headers)
            return 200, await read_body(response, MAX_ANSWER_BYTES), None

    async def open_stream(self, instance: Instance, path: str, body: JsonObject, headers: dict[str, str],
                          deadline: float) -> Upstream:
        """Send a streaming request; on success the caller must close the returned Upstream."""
        remaining = self._timeout(deadline)
        client = self.http()
        request = client.build_request("POST", instance.url + path, json=body, headers=headers, timeout=httpx.Timeout(
            remaining, connect=min(CONNECT_TIMEOUT_S, remaining)))
        instance.count(IN_FLIGHT, 1)
        try:
            response = await asyncio.wait_for(client.send(request, stream=True), remaining)
        except (httpx.HTTPError, TimeoutError) as exc:
            instance.count(IN_FLIGHT, -1)
            raise self.failed(instance, exc) from None
        except asyncio.CancelledError:  # given up (its decode stalled before the headers: migrate.py)
            instance.count(IN_FLIGHT, -1)
            raise
        if response.status_code != 200:
            try:  # by the request's deadline: an answer that trickles in resets each read's timeout
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    content = await _error_body(response)
            except (httpx.HTTPError, TimeoutError):
                content = b""
            finally:  # cancelled too (the client left): the connection and the in-flight count end
                try:
                    await response.aclose()
                finally:  # a second cancellation may interrupt the close: the count ends all the same
                    instance.count(IN_FLIGHT, -1)
            raise self._answered(instance, response.status_code, content, retry_after_of(response.headers))
        return Upstream(instance, response)

    def _answered(self, instance: Instance, status: int, content: bytes, retry_after_s: int | None) -> OpenAIError:
        """An instance's error answer; one that says it is shutting down marks it down at once, as a dropped
        connection does (it takes no more requests; the leg goes on elsewhere: retry.py, migrate.py)."""
        error = error_from_response(instance, status, content, retry_after_s)
        if is_shutting_down(error):
            self.pool.mark_down(instance, STOPPING)
        return error

    async def relay(self, upstream: Upstream, deadline: float,
                    not_migrated: str | None = None) -> AsyncGenerator[bytes, None]:
        """Pass SSE events through one by one; end with an error event if the instance fails, which names
        `not_migrated`: the request's field that kept the stream from moving to another instance (migrate.py)."""
        instance = upstream.instance
        why = f" (not migrated: its `{not_migrated}` field needs more than the token ids so far to go on " \
              "elsewhere)" if not_migrated else ""
        parser = SSEParser()
        finished = False
        reader = ChunkReader(upstream.response, deadline, stopping=self.stopping)
        try:
            while True:
                try:
                    chunk = await reader.next()
                except Interrupted as stop:
                    if stop.reason == "stopping":
                        yield sse_event(stream_cut_body())
                        return
                    raise self.timed_out() from None
                if chunk is None:
                    break
                for data in stream_payloads(parser, chunk, instance):
                    if data == "[DONE]" or data.startswith('{"error"'):
                        finished = True
                        if cut_by_shutdown(data):  # its drain cut the stream: the client's end, and it takes no more
                            self.pool.mark_down(instance, STOPPING)
                    yield sse_data(data)
            if not finished:
                yield sse_event(error_body(502, f"{instance.name} ({instance.url}) closed the stream before it "
                                                f"finished{why}", code="instance_failed"))
        except OpenAIError as exc:
            yield sse_event(exc.body())
        except (httpx.HTTPError, TimeoutError) as exc:
            failed = self.failed(instance, exc)
            yield sse_event(error_body(failed.status, failed.message + why, failed.param, failed.code))
        finally:
            reader.close()
            await upstream.close()


def cut_by_shutdown(data: str) -> bool:
    """Whether a stream's event (its payload) is the shutting_down error event an instance's drain at shutdown ends a
    stream with (http/shutdown_answer.py): the instance is stopping (SIGTERM, its pod deleted)."""
    if not data.startswith('{"error"'):
        return False
    try:
        event = as_object(json.loads(data))
    except ValueError:
        return False
    error = as_object(event.get("error")) if event is not None else None
    return error is not None and error.get("code") == SHUTTING_DOWN_CODE


async def _error_body(response: httpx.Response) -> bytes:
    """An error answer's body, or (past ERROR_MAX_BYTES) what it was, quoted as the error's message."""
    try:
        return await read_body(response, ERROR_MAX_BYTES)
    except AnswerTooLarge as exc:
        return f"HTTP {response.status_code} with {exc}".encode()


def stream_payloads(parser: SSEParser, chunk: bytes, instance: Instance) -> list[str]:
    """The payloads of the events `chunk` completes; a 502 naming `instance` for an event that is not UTF-8 or
    passes the parser's size limit without ending (the relay turns it into the stream's error event rather than
    dropping the client's connection)."""
    try:
        return parser.feed(chunk)
    except UnicodeDecodeError:
        raise OpenAIError(502, f"{instance.name} ({instance.url}) sent a stream event that is not UTF-8",
                          code="instance_failed") from None
    except SSEEventTooLarge as exc:
        raise OpenAIError(502, f"{instance.name} ({instance.url}): {exc}", code="instance_failed") from None


class Interrupted(Exception):
    """A ChunkReader's read ended by `reason`: "deadline" or the name of an event it watches."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChunkReader:
    """Reads a streamed answer's raw chunks in the task that relays them, with no task, timer or
    asyncio.wait per chunk (they were ~14% of the proxy's CPU per relayed event, benchmarks/proxy_relay.py):
    the request's deadline (monotonic seconds) and each watched event (a stall, the shutdown drain's end)
    cancel the read being awaited, as asyncio.timeout does, and never anything else the task awaits (the
    client's write); one that comes between two reads ends the next. A chunk that arrived as the
    interruption came is dropped with the stream. `heed(name)`, asked as a watched event is set, says whether it
    interrupts at all (a stall with nowhere to move the stream: the reads go on). `close()` when done."""

    def __init__(self, response: httpx.Response, deadline: float, heed: Callable[[str], bool] = lambda name: True,
                 **events: asyncio.Event) -> None:
        self._chunks = response.aiter_raw()
        self._heed = heed
        self.reason: str | None = None
        self._reading: asyncio.Task[object] | None = None  # the task awaiting a chunk, while it does
        self._cancelled = False
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._interrupt, "deadline")
        self._watches: list[asyncio.Future[object]] = []
        for name, event in events.items():
            watch: asyncio.Future[object] = asyncio.ensure_future(event.wait())
            watch.add_done_callback(functools.partial(self._on_event, name))
            self._watches.append(watch)

    def _on_event(self, name: str, watch: asyncio.Future[object]) -> None:
        if not watch.cancelled() and self._heed(name):
            self._interrupt(name)

    def _interrupt(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        if self._reading is not None and not self._cancelled:
            self._cancelled = True
            self._reading.cancel()

    async def next(self) -> bytes | None:
        """The next chunk; None at the stream's end; Interrupted when the deadline or an event came first."""
        if self.reason is not None:
            raise Interrupted(self.reason)
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        self._reading = task
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            # Ours alone (no other cancellation pending: the client left, the server stops): the interruption.
            if self._cancelled and task is not None and task.uncancel() <= cancelling and self.reason is not None:
                raise Interrupted(self.reason) from None
            raise
        finally:
            self._reading = None

    def close(self) -> None:
        self._timer.cancel()
        for watch in self._watches:
            watch.cancel()
