"""The proxy's and the instances' time to first byte (http/first_byte.py) through a real PD deployment (tiny
model, real NIXL on CPU, in this process): a streamed request through the proxy is timed once at the proxy and once
at each instance it reached (the prefill's leg, the decode's stream), and the proxy's window holds both legs'."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.tiny_instances import MODEL, TIMEOUT, TinyPD, tiny_pd

INSTANCE_SERIES = "pdlaunch_time_to_first_byte_seconds"  # both instances count into this process's registry
PROXY_SERIES = "pdlaunch_proxy_time_to_first_byte_seconds"


@pytest.fixture(scope="module")
def deployment() -> Iterator[TinyPD]:
    with tiny_pd("first-byte") as pd:
        yield pd


def _instances() -> tuple[float, float]:
    return (REGISTRY.get_sample_value(f"{INSTANCE_SERIES}_count") or 0.0,
            REGISTRY.get_sample_value(f"{INSTANCE_SERIES}_sum") or 0.0)


def _proxy(url: str) -> tuple[float, float]:
    samples = {(s.name, s.labels.get("route")): s.value
               for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=TIMEOUT).text)
               for s in f.samples}
    return (samples.get((f"{PROXY_SERIES}_count", "/v1/completions"), 0.0),
            samples.get((f"{PROXY_SERIES}_sum", "/v1/completions"), 0.0))


def test_a_streamed_pd_request_is_timed_at_the_proxy_and_at_both_instances(deployment: TinyPD) -> None:
    proxy_before, instances_before = _proxy(deployment.proxy), _instances()
    with httpx.stream("POST", f"{deployment.proxy}/v1/completions", timeout=TIMEOUT, json={
            "model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0.0,
            "stream": True}) as r:
        assert r.status_code == 200
        body = r.read().decode()
    assert "data: [DONE]" in body
    proxy_after, instances_after = _proxy(deployment.proxy), _instances()
    assert proxy_after[0] - proxy_before[0] == 1
    assert instances_after[0] - instances_before[0] == 2  # the prefill's leg and the decode's stream
    # The proxy's window (request in to first byte out) holds the prefill leg's and then the decode's.
    assert proxy_after[1] - proxy_before[1] >= instances_after[1] - instances_before[1]


def test_a_refused_request_is_not_timed(deployment: TinyPD) -> None:
    proxy_before, instances_before = _proxy(deployment.proxy), _instances()
    r = httpx.post(f"{deployment.proxy}/v1/completions", timeout=TIMEOUT,
                   json={"model": MODEL, "prompt": "x", "max_tokens": -1})
    assert r.status_code == 400
    assert _proxy(deployment.proxy)[0] == proxy_before[0] and _instances()[0] == instances_before[0]
