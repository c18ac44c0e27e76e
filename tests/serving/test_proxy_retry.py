"""The proxy retries a leg once on another live instance when the picked one refused the connection
(it died), and never retries a stream that already sent bytes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.http.sse import parse_sse
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.serving.helpers import ThreadServer
from tests.serving.test_proxy_failures import ScriptedInstance


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[str, ScriptedInstance, ScriptedInstance, InstancePool]]:
    ports = PortAllocator("127.0.0.1")
    prefill, decode = ScriptedInstance("prefill"), ScriptedInstance("decode")
    dead = [f"http://127.0.0.1:{ports.free('nothing listens')}" for _ in range(2)]
    with ThreadServer(prefill.app, ports.free("prefill")) as p, ThreadServer(decode.app, ports.free("decode")) as d:
        pool = InstancePool([Instance("prefill", dead[0], "prefill-dead"), Instance("prefill", p.url, "prefill-0"),
                             Instance("decode", dead[1], "decode-dead"), Instance("decode", d.url, "decode-0")],
                            "round_robin")
        with ThreadServer(build_proxy_app(pool, request_timeout_s=5.0), ports.free("proxy")) as proxy:
            yield proxy.url, prefill, decode, pool


def test_dead_prefill_and_dead_decode_are_retried_on_live_ones(setup: Any) -> None:
    url, prefill, decode, pool = setup
    for inst in pool.instances:
        inst.state = "ready"
    before_p, before_d = len(prefill.requests), len(decode.requests)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "stream": True}, timeout=10)
    assert r.status_code == 200
    assert [json.loads(e)["choices"][0]["text"] for e in parse_sse(r.content)[:-1]] == ["t0", "t1", "t2"]
    assert len(prefill.requests) == before_p + 1 and len(decode.requests) == before_d + 1
    assert {i.name: i.state for i in pool.instances}["prefill-dead"] == "down"
    assert {i.name: i.state for i in pool.instances}["decode-dead"] == "down"


def test_a_stream_that_broke_after_bytes_is_not_retried(setup: Any) -> None:
    url, _, decode, pool = setup
    for inst in pool.instances:
        inst.state = "ready" if "dead" not in inst.name else "down"
    before = len(decode.requests)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "drop", "stream": True}, timeout=10)
    events = parse_sse(r.content)
    assert [json.loads(e)["choices"][0]["text"] for e in events[:3]] == ["t0", "t1", "t2"]
    assert "error" in json.loads(events[-2]) and events[-1] == "[DONE]"
    assert len(decode.requests) == before + 1  # one decode leg: no second try after bytes went out


def test_models_is_retried_too(setup: Any) -> None:
    url, _, _, pool = setup
    for inst in pool.instances:
        inst.state = "ready"
    for _ in range(2):  # round robin: one of two picks is the dead decode
        r = httpx.get(f"{url}/v1/models", timeout=10)
        assert r.status_code != 503, r.text  # the scripted decode has no /v1/models: its 404 passes through
    assert {i.name: i.state for i in pool.instances}["decode-dead"] == "down"
