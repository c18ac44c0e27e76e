"""Helpers of the serving tests: an app served by uvicorn in a thread, bounded waits."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn

if TYPE_CHECKING:
    from pdlaunch.config.deployment_config import DeploymentConfig
    from pdlaunch.engine.llm_engine import LLMEngine
    from pdlaunch.server.engine_loop import EngineLoop


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30.0, poll: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy; fail saying what was awaited if it takes over `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up after {timeout:.0f}s waiting for {what}"
        time.sleep(poll)



def follow_decode_feed(url: str, until: Callable[[Any], bool], stop: threading.Event, polls: int = 600) -> set[Any]:
    """Follow the KV events of the one decode instance ("decode-0") at `url` with the proxy's feed until
    `until(its cached blocks)` holds, polling every 0.05 s at most `polls` times; then its cached hashes. `stop`
    is set once the feed stopped (it ends a scripted instance's held streams)."""
    import httpx

    from pdlaunch.proxy.instances import Instance
    from pdlaunch.proxy.kv_events import KvEventFeed

    feed = KvEventFeed([Instance("decode", url, "decode-0", state="ready")], {})

    async def follow() -> set[Any]:
        async with httpx.AsyncClient() as client:
            feed.start(client)
            try:
                for _ in range(polls):
                    if until(feed.cached["decode-0"]):
                        break
                    await asyncio.sleep(0.05)
                return set(feed.cached["decode-0"].hashes)
            finally:
                await feed.stop()
                stop.set()

    return asyncio.run(follow())

class ThreadServer:
    """Serve an ASGI app on 127.0.0.1:port from a daemon thread (lifespan included); `config`: uvicorn's
    settings of a real process instead (their app and port)."""

    def __init__(self, app: Any, port: int, start_timeout: float = 120.0, config: uvicorn.Config | None = None) -> None:
        self.server = uvicorn.Server(config or uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                                             timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"
        self.start_timeout = start_timeout

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), f"test server on {self.url}",
                 self.start_timeout)
        assert self.server.started, f"test server on {self.url} failed to start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def tiny_colocated(max_model_len: int) -> DeploymentConfig:
    """One colocated instance of the tiny random model on CPU (128 blocks of 8 tokens, a deployment secret),
    its context `max_model_len` tokens: the config of the module fixtures that serve it in process."""
    from pdlaunch.config.deployment_config import DeploymentConfig

    return DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": max_model_len}, "cache": {"num_gpu_blocks": 128, "block_size": 8},
        "security": {"deployment_secret": "test-deployment-secret-0123456789"},
    })


@contextmanager
def in_process_instance(cfg: DeploymentConfig, engine_id: str, max_pending_requests: int = 16,
                        ) -> Iterator[tuple[str, EngineLoop]]:
    """One colocated instance (engine thread + HTTP API) of `cfg` in this process, on a free port:
    yields (its URL, its engine loop) once /health answers; stopped on exit."""
    import httpx

    from pdlaunch.config.deployment_config import InstanceSpec
    from pdlaunch.engine.llm_engine import LLMEngine
    from pdlaunch.launcher.ports import PortAllocator
    from pdlaunch.server.app import build_app
    from pdlaunch.server.engine_loop import EngineLoop

    port = PortAllocator("127.0.0.1").free("test instance")
    spec = InstanceSpec(role="colocated", port=port, engine_id=engine_id)
    loop = EngineLoop(lambda: LLMEngine(cfg, spec), max_pending_requests=max_pending_requests)
    with ThreadServer(build_app(loop, cfg, spec), port) as srv:
        wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 200, "the engine to load", 120)
        yield srv.url, loop


@contextmanager
def tiny_instance(name: str) -> Iterator[str]:
    """The tiny model as one colocated CPU instance in this process (max_model_len 512, 64 KV blocks); yields its
    URL. `name`: its engine id and the root of its deployment secret."""
    from pdlaunch.config.deployment_config import DeploymentConfig

    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": 512}, "cache": {"num_gpu_blocks": 64},
        "security": {"deployment_secret": f"{name}-secret-0123456789"},
    })
    with in_process_instance(cfg, f"{name}-0") as (url, _):
        yield url


@contextmanager
def waiting_to_recompute(loop: EngineLoop, request_id: str) -> Iterator[None]:
    """A request in the scheduler's recompute queue (its KV load failed; it waits for its old blocks to be safe to
    free) while the block runs, put there and taken out on the engine thread between two steps."""
    from pdlaunch.engine.outputs import SamplingParams
    from pdlaunch.engine.request import Request

    request = Request(request_id, [1, 2, 3], SamplingParams(max_tokens=1), arrival=0)

    def park(engine: LLMEngine) -> None:
        engine.scheduler.recomputing[request_id] = request

    def unpark(engine: LLMEngine) -> None:
        engine.scheduler.recomputing.pop(request_id, None)

    asyncio.run(loop.call(park))
    try:
        yield
    finally:
        asyncio.run(loop.call(unpark))


def held_kv(url: str, timeout: float = 180.0) -> tuple[int, int]:
    """(requests whose KV the instance at `url` holds for a decode, KV blocks it has in use): its /info's stats."""
    stats = httpx.get(f"{url}/info", timeout=timeout).json()["stats"]
    return stats["num_held"], stats["num_blocks_used"]


def prompt_from(first: int, tokens: int) -> list[int]:
    """`tokens` token ids starting with `first` (a prompt of its own: none of it in another's prefix cache)."""
    return [first] + [(first + i) % 200 + 1 for i in range(1, tokens)]



@contextmanager
def steady_load(url: str) -> Iterator[list[tuple[float, int, str]]]:
    """Completions of the tiny model sent one after another to `url` (a proxy) from a thread while the block runs,
    each recorded as (when it was sent, time.monotonic(); its status; its body's first 300 characters). The thread
    stops and is joined when the block ends."""
    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            i = 0
            while not stop.is_set():
                started = time.monotonic()
                r = client.post(f"{url}/v1/completions", json={
                    "model": "tiny", "prompt": f"request {i} of a steady stream", "max_tokens": 2})
                results.append((started, r.status_code, r.text[:300]))
                i += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        yield results
    finally:
        stop.set()
        thread.join(60)


def on_event_loop() -> bool:
    """Whether the calling thread runs an event loop (a worker thread of asyncio.to_thread runs none)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def drain_ends_while_a_body_arrives(app: Any, stopping: asyncio.Event, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Run `app` (ASGI, as uvicorn runs it: the request in a task of its own) on a POST /v1/completions whose body
    stops half-way; once its first part is read, the drain at shutdown ends (`stopping` set). The messages the app
    sent. `timeout` stays well below BodyLimit's 30 s wait for a stalled body."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")], "scheme": "http",
        "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2),
    }

    async def run() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        part_read = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if not part_read.is_set():
                part_read.set()
                return {"type": "http.request", "body": b'{"prompt": "hel', "more_body": True}
            await asyncio.Event().wait()  # the rest of the body never comes
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        request = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.wait_for(part_read.wait(), timeout)
        stopping.set()
        await asyncio.wait_for(request, timeout)
        return sent

    return asyncio.run(run())


def answered_shutting_down(sent: list[dict[str, Any]]) -> None:
    """`sent` is the 503 shutting_down with Retry-After 1 that the drain's cut gives (http/shutdown_answer.py)."""
    assert sent and sent[0]["type"] == "http.response.start", sent
    assert sent[0]["status"] == 503, sent
    assert (b"retry-after", b"1") in sent[0]["headers"], sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "shutting_down", sent[1]
