"""The proxy's /metrics carries every ready instance's series, labelled by instance and role."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client.parser import text_string_to_metric_families

from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.serving.helpers import ThreadServer, wait_for

SECRET = "federation-test-secret-0123456789"


def _instance(tokens: int) -> FastAPI:
    app = FastAPI()
    seen: list[dict[str, str]] = []
    app.state.seen = seen

    @app.get("/health")
    async def health() -> Any:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Any = None) -> Any:
        return PlainTextResponse(
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
            "# TYPE vllm:prompt_tokens_total counter\n"
            f'vllm:prompt_tokens_total{{engine="0",model_name="tiny"}} {tokens}.0\n'
            "# HELP pdlaunch_kv_blocks_used KV blocks in use\n# TYPE pdlaunch_kv_blocks_used gauge\n"
            "pdlaunch_kv_blocks_used 3.0\n")

    return app


@pytest.fixture(scope="module")
def proxy() -> Iterator[tuple[str, InstancePool]]:
    ports = PortAllocator("127.0.0.1")
    with ThreadServer(_instance(5), ports.free("p")) as p, ThreadServer(_instance(7), ports.free("d")) as d:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d.url, "decode-0")])
        with ThreadServer(build_proxy_app(pool, 5.0, deployment_secret=SECRET), ports.free("proxy")) as srv:
            wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 200, "the proxy to see both instances")
            yield srv.url, pool


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_one_scrape_has_every_instance_labelled(proxy: tuple[str, InstancePool]) -> None:
    url, _ = proxy
    samples = _samples(httpx.get(f"{url}/metrics", timeout=10).text)
    labels = (("engine", "0"), ("instance", "prefill-0"), ("model_name", "tiny"), ("role", "prefill"))
    assert samples[("vllm:prompt_tokens_total", labels)] == 5
    labels = (("engine", "0"), ("instance", "decode-0"), ("model_name", "tiny"), ("role", "decode"))
    assert samples[("vllm:prompt_tokens_total", labels)] == 7
    assert samples[("pdlaunch_kv_blocks_used", (("instance", "decode-0"), ("role", "decode")))] == 3
    assert any(name == "pdlaunch_proxy_requests_total" for name, _ in samples)


def test_an_unreachable_instance_is_left_out(proxy: tuple[str, InstancePool]) -> None:
    url, pool = proxy
    gone = Instance("decode", f"http://127.0.0.1:{PortAllocator('127.0.0.1').free('nothing')}", "decode-1", "ready")
    pool.instances.append(gone)
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
    finally:
        pool.instances.remove(gone)
    samples = _samples(response.text)
    assert response.status_code == 200
    federated = [dict(labels)["instance"] for name, labels in samples
                 if not name.startswith("pdlaunch_proxy_") and "instance" in dict(labels)]
    assert "decode-1" not in federated and "decode-0" in federated


def test_an_instance_whose_text_breaks_halfway_or_retypes_a_family_adds_nothing() -> None:
    """Its series are all left out (and it is counted missed), not the part before the bad line; a family
    another instance already gave another type is refused rather than merged under the first type."""
    from pdlaunch.proxy.federate import _merge

    good = "# TYPE pdlaunch_kv_blocks_used gauge\npdlaunch_kv_blocks_used 3.0\n"
    families: dict[str, Any] = {}
    _merge(families, good, Instance("decode", "http://d0", "decode-0"))
    broken = "# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total 5.0\nnot a sample line at all {\n"
    with pytest.raises(ValueError):
        _merge(families, broken, Instance("prefill", "http://p0", "prefill-0"))
    retyped = "# TYPE pdlaunch_kv_blocks_used counter\npdlaunch_kv_blocks_used_total 9.0\n"
    with pytest.raises(ValueError, match="a counter here and a gauge"):
        _merge(families, retyped, Instance("prefill", "http://p1", "prefill-1"))
    assert list(families) == ["pdlaunch_kv_blocks_used"]
    assert [s.labels["instance"] for s in families["pdlaunch_kv_blocks_used"].samples] == ["decode-0"]


def _exposing(exposition: str) -> FastAPI:
    """/health ok; /metrics as given."""
    app = FastAPI()
    app.get("/health")(lambda: {"status": "ok"})
    app.get("/metrics")(lambda: PlainTextResponse(exposition))
    return app


@pytest.mark.parametrize("timestamp", ["NaN", "+Inf", "1e400"])
def test_an_instance_with_a_non_finite_sample_timestamp_is_left_out_not_the_whole_answer(timestamp: str) -> None:
    """`x 1 NaN` (a sample whose timestamp is NaN, which prometheus_client's parser takes) was merged, then failed the
    rendering of the whole answer (int(nan)): the proxy's /metrics answered 500 on every scrape, its own series lost
    with every instance's, until that one instance changed. Now that instance is left out and counted."""
    ports = PortAllocator("127.0.0.1")
    good, bad = _exposing("ok_metric 1\n"), _exposing(f"ok_metric 2\nbroken_metric 1 {timestamp}\n")
    with ThreadServer(good, ports.free("prefill")) as p, ThreadServer(bad, ports.free("decode")) as d:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d.url, "decode-0")])
        with ThreadServer(build_proxy_app(pool, 30.0), ports.free("proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "both instances ready")
            answers = [httpx.get(f"{proxy.url}/metrics", timeout=10) for _ in range(2)]
    for answer in answers:
        assert answer.status_code == 200, answer.text[:300]
    samples = _samples(answers[-1].text)
    assert samples[("ok_metric", (("instance", "prefill-0"), ("role", "prefill")))] == 1
    federated = {dict(labels)["instance"] for name, labels in samples
                 if not name.startswith("pdlaunch_proxy_") and "instance" in dict(labels)}
    assert federated == {"prefill-0"}
    assert samples[("pdlaunch_proxy_federation_errors_total", ())] == 2  # one per scrape
