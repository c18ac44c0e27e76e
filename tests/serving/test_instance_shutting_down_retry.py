"""An instance whose engine stops (its shutdown, once uvicorn's graceful drain has run out) answers a request it cut
503 shutting_down with `Retry-After` (seconds), as the proxy's own shutting_down does: the client's retry goes to a
running instance (through the proxy, another one of the role; or this one, restarted). The proxy passes an
instance's Retry-After on (http/retry_later.retry_after_of). Through HTTP against a tiny instance in process."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import in_process_instance, tiny_colocated, wait_for

TIMEOUT_S = 60.0


def _hold_engine_thread(loop: EngineLoop, gate: threading.Event) -> threading.Thread:
    """A call that keeps the engine thread busy until `gate` is set: requests sent meanwhile wait in its queue."""
    def hold() -> None:
        asyncio.run(loop.call(lambda _: gate.wait(TIMEOUT_S), timeout=TIMEOUT_S))

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return thread


def test_a_request_the_instances_stop_cuts_gets_503_shutting_down_with_retry_after() -> None:
    gate = threading.Event()
    with in_process_instance(tiny_colocated(256), "test-shutting-down-retry-0") as (url, loop):
        holder = _hold_engine_thread(loop, gate)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, f"{url}/v1/completions", timeout=TIMEOUT_S,
                                 json={"prompt": "hello", "max_tokens": 4})
            wait_for(lambda: loop.num_pending == 1, "the request to wait behind the held engine thread", TIMEOUT_S)
            stopper = threading.Thread(target=loop.stop, args=(TIMEOUT_S,), daemon=True)
            stopper.start()  # as the instance's lifespan does at its shutdown
            wait_for(loop._stop.is_set, "stop() to ask the engine thread to stop", TIMEOUT_S)
            gate.set()
            r = answer.result(TIMEOUT_S)
        holder.join(TIMEOUT_S)
        stopper.join(TIMEOUT_S)
    assert r.status_code == 503, (r.status_code, r.text)
    assert r.json()["error"]["code"] == "shutting_down", r.text
    assert r.headers.get("retry-after") == "1", r.headers
