"""A decode that loaded the prefill's KV and then dropped the proxy's connection (it died before its answer went
out): the proxy sends the leg once to another decode (proxy.migration_limit 0: retry.py). With the prefill's
kv_transfer_params again, that decode's load was refused (the prefill freed the hold at the first load's read_done)
and, under kv_transfer.load_failure_policy fail, the client got a 502 for a request a live decode could answer. Now the
leg goes without the params (the prefill's hold released), the decode computes the prompt, and the client gets what
the first decode answered.

The same in push mode (the decode asks the prefill to WRITE the KV), and there a decode that refused the connection
(it never got the leg) leaves the leg to another decode with the params: that decode loads the prefill's hold, which
the retry kept (under policy fail a lost hold would fail the request).

Real components in this process: a tiny prefill and two decodes (real engines, NIXL over DRAM, pull or push) behind
the real proxy; the first decode in the proxy's pool is a stand-in that passes the leg to one real decode, waits for
its whole answer and for the prefill's hold to end, then closes the proxy's connection without an answer; the other
real decode is the pool's second (one of its own: the first has the prompt in its prefix cache and would load nothing).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy import instances
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.helpers.http_server import served
from tests.kv_transfer.deployment_secret import TEST_SECRET
from tests.serving.helpers import ThreadServer, held_kv, prompt_from, wait_for
from tests.serving.tiny_instances import MODEL, TIMEOUT, serve_tiny

pytestmark = pytest.mark.slow

PROMPT = prompt_from(11, 40)  # 5 blocks of 8


class _ReadThenDrop(BaseHTTPRequestHandler):
    """A decode that runs each leg on the real decode (`decode`), then, once the prefill (`prefill`) holds nothing,
    closes the connection without an answer; the real decode's answers in `answers`."""

    decode: str
    prefill: str
    answers: list[dict[str, Any]]

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        payload = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        answer = httpx.post(self.decode + self.path, content=body, headers=headers, timeout=TIMEOUT)
        self.answers.append(answer.json())
        wait_for(lambda: held_kv(self.prefill)[0] == 0, "the prefill to free the hold the decode read", TIMEOUT)
        self.close_connection = True  # nothing sent: it died before its answer went out

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


@pytest.fixture(params=["pull", "push"])
def pd(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(the proxy's URL, the answers the dropping decode's leg got from the real decode)."""
    with _deployment(request.param, refused_first=False) as (url, answers, _):
        yield url, answers


@contextmanager
def _deployment(transfer_mode: str, refused_first: bool) -> Iterator[tuple[str, list[dict[str, Any]], str]]:
    """(the proxy's URL, the answers the dropping decode's leg got, the prefill's URL); the pool's first decode drops
    the connection after its leg loaded, or, `refused_first`, refuses it (nothing listens on its port)."""
    with ExitStack() as stack, pytest.MonkeyPatch.context() as patch:
        patch.setattr(instances, "HEALTH_INTERVAL_S", 3600.0)  # the dropped decode stays down once the leg marks it
        patch.setattr(instances, "STARTING_INTERVAL_S", 3600.0)
        servers = []
        for role, name in (("prefill", "prefill"), ("decode", "decode-a"), ("decode", "decode-b")):
            server, _ = serve_tiny(role, f"retried-leg-{transfer_mode}-{name}", load_failure_policy="fail",
                                   transfer_mode=transfer_mode)
            stack.callback(server.__exit__, None, None, None)
            servers.append(server.url)
        answers: list[dict[str, Any]] = []
        handler = type("ReadThenDrop", (_ReadThenDrop,), {"prefill": servers[0], "decode": servers[1],
                                                           "answers": answers})
        dropping = f"http://127.0.0.1:{PortAllocator('127.0.0.1').free('nothing listens')}" if refused_first else \
            stack.enter_context(served(ThreadingHTTPServer(("127.0.0.1", 0), handler)))
        pool = InstancePool([Instance("prefill", servers[0], "prefill-0"), Instance("decode", dropping, "decode-0"),
                             Instance("decode", servers[2], "decode-1")])
        if refused_first:  # no probe marks the dead decode down before the leg is sent to it
            async def every_instance_ready(_client: httpx.AsyncClient, instance: Instance) -> None:
                if instance.state == "starting":
                    instance.state = "ready"

            pool._check = every_instance_ready  # type: ignore[method-assign,assignment]  # noqa: SLF001
        app = build_proxy_app(pool, TIMEOUT, deployment_secret=TEST_SECRET, load_failure_policy="fail",
                              migration_limit=0)
        proxy = stack.enter_context(ThreadServer(app, PortAllocator("127.0.0.1").free("proxy")))
        wait_for(lambda: all(i.state == "ready" for i in pool.instances), "the proxy to see every instance", TIMEOUT)
        pool.policy.choose = lambda role, ready: ready[0]  # type: ignore[method-assign]  # decode-0 first
        yield proxy.url, answers, servers[0]


def test_a_decode_that_read_the_kv_and_dropped_the_connection_leaves_a_leg_another_decode_answers(
        pd: tuple[str, list[dict[str, Any]]]) -> None:
    url, answers = pd
    answer = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0.0})
    assert answer.status_code == 200, answer.text
    assert len(answers) == 1 and answers[0]["choices"][0]["text"], answers  # the first decode loaded and answered
    assert answer.json()["choices"][0]["text"] == answers[0]["choices"][0]["text"]
    metrics = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    assert 'pdlaunch_proxy_legs_retried_total{reason="instance_gone",role="decode"} 1.0' in metrics
    assert json.loads(httpx.get(f"{url}/instances", timeout=TIMEOUT).text)  # the proxy still answers


def test_in_push_mode_a_leg_whose_decode_refused_the_connection_loads_the_kept_hold_on_another() -> None:
    with _deployment("push", refused_first=True) as (url, _, prefill):
        answer = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={
            "model": MODEL, "prompt": prompt_from(61, 40), "max_tokens": 6, "temperature": 0.0})
        assert answer.status_code == 200, answer.text  # under policy fail: decode-1 loaded the hold the retry kept
        metrics = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
        assert 'pdlaunch_proxy_legs_retried_total{reason="instance_gone",role="decode"} 1.0' in metrics
        wait_for(lambda: held_kv(prefill)[0] == 0, "the prefill's hold to end with decode-1's load", TIMEOUT)
