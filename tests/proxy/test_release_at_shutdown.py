"""A request that the proxy's shutdown cuts while its decode leg runs still gets the prefill's hold released
(release.py): uvicorn cancels the requests its graceful timeout leaves, then at once runs the lifespan's end, while
the cancelled requests unwind (their legs' connections closed first) and only then ask for the release; the drain
that ended the releases in flight returned before they asked, and the release went nowhere (the prefill kept the
blocks until its lease, kv_transfer.kv_lease_seconds)."""

from __future__ import annotations

import threading
from contextlib import ExitStack

import httpx
import pytest

from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_hardening import SECRET, Decode, Prefill


def _pool(stack: ExitStack, ports: PortAllocator, prefill: Prefill, decode: Decode) -> InstancePool:
    """The proxy's pool over `prefill` and `decode`, each served until `stack` closes."""
    p = stack.enter_context(ThreadServer(prefill.app, ports.free("prefill")))
    d = stack.enter_context(ThreadServer(decode.app, ports.free("decode")))
    return InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d.url, "decode-0")])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_request_cut_by_the_shutdown_releases_the_prefills_hold(stream: bool) -> None:
    ports = PortAllocator("127.0.0.1")
    prefill, decode = Prefill(), Decode()
    with ExitStack() as stack:
        pool = _pool(stack, ports, prefill, decode)
        proxy = ThreadServer(build_proxy_app(pool, 60.0, deployment_secret=SECRET), ports.free("proxy"))
        with proxy:
            wait_for(lambda: all(i.state == "ready" for i in pool.instances), "the proxy to take both instances")
            answers: list[object] = []

            def client() -> None:  # the decode answers after 30 s: the shutdown cuts the request first
                try:
                    answers.append(httpx.post(f"{proxy.url}/v1/completions", timeout=60,
                                              json={"prompt": "wait", "max_tokens": 4, "stream": stream}))
                except httpx.HTTPError as exc:
                    answers.append(exc)

            caller = threading.Thread(target=client, daemon=True)
            caller.start()
            wait_for(lambda: decode.waiting.is_set() and prefill.legs, "the decode leg to reach the decode")
        assert not proxy.thread.is_alive(), "the proxy did not stop"
        held = prefill.legs[-1]
        wait_for(lambda: held in prefill.released, f"the prefill to be asked to release {held}", timeout=10)
        caller.join(30)


def test_requests_that_ended_leave_nothing_for_the_shutdown_to_wait_for() -> None:
    """Every request's count ends with it (a stream's when it closes), so a shutdown waits for none that ended."""
    ports = PortAllocator("127.0.0.1")
    prefill, decode = Prefill(), Decode()
    with ExitStack() as stack:
        pool = _pool(stack, ports, prefill, decode)
        app = build_proxy_app(pool, 60.0, deployment_secret=SECRET)
        proxy = stack.enter_context(ThreadServer(app, ports.free("proxy")))
        wait_for(lambda: all(i.state == "ready" for i in pool.instances), "the proxy to take both instances")
        for prompt in ("ok", "refuse", "fail", ["ok", "ok"], ["ok", "refuse"]):
            for stream in (False, True):
                httpx.post(f"{proxy.url}/v1/completions", json={"prompt": prompt, "max_tokens": 4, "stream": stream},
                           timeout=30)
        releaser = app.state.proxy_state.proxy.kv
        wait_for(lambda: releaser._open == 0, "every request's count to end")  # noqa: SLF001
