"""A decode leg sent again to another decode because its first decode is gone (retry.py) goes there with the prefill's
kv_transfer_params only when the first never got the leg (it refused the connection). One that dropped the connection
or answered 503 shutting_down may have read the prefill's KV before it went: the prefill freed that hold at its
read_done, and the same params would fail the new decode's load (kv_transfer.load_failure_policy fail: the request
fails) or cost it a refused claim before it computes the prompt. So that leg goes as a migration does (migrate.py):
the client's request without the params, the prefill's hold released. With proxy.migration_limit 0 and 3, whole and
streamed. Through the proxy's HTTP app in front of fake instances; the real failure, on real engines, is
tests/proxy/test_retried_decode_leg_kv_e2e.py."""

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
from tests.helpers.probes import first_probes_over
from tests.proxy.test_shutting_down_instance import _Decode, _Stopping
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_hardening import SECRET, Prefill

RETRIED = 'pdlaunch_proxy_legs_retried_total{reason="instance_gone",role="decode"} 1.0'


class _Dropping(BaseHTTPRequestHandler):
    """A decode that reads each leg and closes the connection without an answer (it died mid-request); its /health
    answers ok."""

    bodies: list[dict[str, Any]]  # set on the subclass made per server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        payload = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.close_connection = True  # nothing sent: the proxy reads "Server disconnected without sending a response"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


@contextmanager
def _dropping(bodies: list[dict[str, Any]]) -> Iterator[str]:
    handler = type("Dropping", (_Dropping,), {"bodies": bodies})
    with served(ThreadingHTTPServer(("127.0.0.1", 0), handler)) as url:
        yield url


@contextmanager
def _deployment(prefill: Prefill, first_decode: str | None, decode: _Decode, migration_limit: int) -> Iterator[
        tuple[str, InstancePool]]:
    """The proxy (its URL, its pool) in front of `prefill` and two decodes, the first picked first: `first_decode`'s
    URL, or with None a port nothing listens on (a decode that died since its last probe: it refuses the connection),
    then `decode`. The proxy probes each instance once: what a leg finds is what the test made, not a probe's word."""
    ports = PortAllocator("127.0.0.1")
    with ExitStack() as stack, pytest.MonkeyPatch.context() as patch:
        patch.setattr(instances, "HEALTH_INTERVAL_S", 3600.0)
        patch.setattr(instances, "STARTING_INTERVAL_S", 3600.0)
        p = stack.enter_context(ThreadServer(prefill.app, ports.free("prefill")))
        d = stack.enter_context(ThreadServer(decode.app, ports.free("decode")))
        first = first_decode or f"http://127.0.0.1:{ports.free('nothing listens')}"
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", first, "decode-0"),
                             Instance("decode", d.url, "decode-1")])
        probes_over = first_probes_over(pool, patch)
        app = build_proxy_app(pool, 60.0, deployment_secret=SECRET, migration_limit=migration_limit)
        proxy = stack.enter_context(ThreadServer(app, ports.free("proxy")))
        # every first probe over, the dead one's too: one that ended after the line below would mark it down again
        wait_for(probes_over, "the proxy's first probes of each instance", 30)
        probed = pool.instances if first_decode else [pool.instances[0], pool.instances[2]]
        assert all(i.state == "ready" for i in probed), [(i.name, i.state, i.detail) for i in pool.instances]
        pool.instances[1].state = "ready"  # (the dead one: as its last probe before it died saw it)
        pool.policy.choose = lambda role, ready: ready[0]  # type: ignore[method-assign]  # the first ready one
        yield proxy.url, pool


def _post(url: str, stream: bool) -> str:
    answer = httpx.post(f"{url}/v1/completions", json={"prompt": "go", "max_tokens": 4, "stream": stream}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert '"done"' in answer.text and '"error"' not in answer.text, answer.text
    return answer.text


@pytest.mark.parametrize("migration_limit", [0, 3])
@pytest.mark.parametrize("stream", [False, True])
def test_a_leg_whose_decode_dropped_the_connection_goes_on_without_the_prefills_kv(stream: bool,
                                                                                 migration_limit: int) -> None:
    prefill, decode, dropped = Prefill(), _Decode(), []
    with _dropping(dropped) as first, _deployment(prefill, first, decode, migration_limit) as (url, pool):
        _post(url, stream)
        assert dropped[0]["kv_transfer_params"]["remote_request_id"] == prefill.legs[0]  # it may have read the KV
        assert "kv_transfer_params" not in decode.bodies[0]  # the other computes the prompt itself
        assert decode.bodies[0]["prompt"] == "go" and decode.bodies[0]["max_tokens"] == 4
        wait_for(lambda: prefill.released == prefill.legs, "the prefill's held KV to be released", 10.0)
        assert RETRIED in httpx.get(f"{url}/metrics", timeout=10).text
        assert len(dropped) == 1 and len(decode.bodies) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_leg_whose_decode_refused_the_connection_keeps_the_prefills_kv(stream: bool) -> None:
    prefill, decode = Prefill(), _Decode()
    with _deployment(prefill, None, decode, 0) as (url, pool):
        _post(url, stream)
        # decode-0 never got the leg: the prefill's KV is unread, and decode-1 loads it
        assert decode.bodies[0]["kv_transfer_params"]["remote_request_id"] == prefill.legs[0]
        assert RETRIED in httpx.get(f"{url}/metrics", timeout=10).text
        assert prefill.released == []


@pytest.mark.parametrize("stream", [False, True])
def test_without_migration_a_leg_whose_decode_answered_shutting_down_goes_on_without_the_prefills_kv(
        stream: bool) -> None:
    """An instance answers shutting_down to a leg its drain's end cut, one that ran and may have read the KV."""
    prefill, stopping, decode = Prefill(), _Stopping(), _Decode()
    with ThreadServer(stopping.app, PortAllocator("127.0.0.1").free("stopping")) as first, \
            _deployment(prefill, first.url, decode, 0) as (url, pool):
        _post(url, stream)
        assert "kv_transfer_params" in stopping.bodies[0] and "kv_transfer_params" not in decode.bodies[0]
        wait_for(lambda: prefill.released == prefill.legs, "the prefill's held KV to be released", 10.0)
        assert RETRIED in httpx.get(f"{url}/metrics", timeout=10).text


@pytest.mark.parametrize("stream", [False, True])
def test_a_leg_whose_decode_and_retry_both_dropped_the_connection_migrates_to_a_third(stream: bool) -> None:
    """Two decodes gone at once (a node with both went down) before the probe saw either: the leg's decode drops the
    connection, and so does the one its retry goes to. A third is ready and the migration limit allows a move: the
    request goes there, a stream as a whole request does, rather than the client getting the 502 of the second."""
    prefill, decode, dropped = Prefill(), _Decode(), []
    ports = PortAllocator("127.0.0.1")
    with ExitStack() as stack, pytest.MonkeyPatch.context() as patch:
        patch.setattr(instances, "HEALTH_INTERVAL_S", 3600.0)
        patch.setattr(instances, "STARTING_INTERVAL_S", 3600.0)
        p = stack.enter_context(ThreadServer(prefill.app, ports.free("prefill")))
        gone = [stack.enter_context(_dropping(dropped)) for _ in range(2)]
        d = stack.enter_context(ThreadServer(decode.app, ports.free("decode")))
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", gone[0], "decode-0"),
                             Instance("decode", gone[1], "decode-1"), Instance("decode", d.url, "decode-2")])
        probes_over = first_probes_over(pool, patch)
        app = build_proxy_app(pool, 60.0, deployment_secret=SECRET, migration_limit=3)
        url = stack.enter_context(ThreadServer(app, ports.free("proxy"))).url
        wait_for(probes_over, "the proxy's first probes of each instance", 30)
        assert all(i.state == "ready" for i in pool.instances), [(i.name, i.state) for i in pool.instances]
        pool.policy.choose = lambda role, ready: ready[0]  # type: ignore[method-assign]  # the first ready one
        _post(url, stream)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert len(dropped) == 2 and len(decode.bodies) == 1
    assert "kv_transfer_params" not in decode.bodies[0]  # the dropped ones may have read the prefill's KV
    assert RETRIED in metrics and 'pdlaunch_proxy_migrations_total{reason="died"} 1.0' in metrics
    wait_for(lambda: prefill.released == prefill.legs, "the prefill's held KV to be released", 10.0)
