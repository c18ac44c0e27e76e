"""A PD request whose prefill leg can run nowhere: its prefill is gone (refused the connection, dropped it before
answering, or answered 503 shutting_down while it stops) and no other prefill is ready, or no prefill is ready when
the request arrives (all restarting). Under kv_transfer.load_failure_policy recompute the decode computes the prompt
itself, as for a stalled prefill: the client's request goes to the decode alone, without kv_transfer_params, and
counts in pdlaunch_proxy_legs_retried{role="prefill",reason="recompute"}. Under fail the client gets a 503 no_instance
with Retry-After that names the prefill, the policy's field and how to change it. Before, in a 1P1D deployment whose
prefill restarted or was rolled, every PD request failed though the decode could compute it. Through the proxy's HTTP
app in front of fake instances, whole and streamed."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest

from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy import instances
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.helpers.probes import first_probes_over
from tests.proxy.test_retried_decode_leg_kv import _dropping
from tests.proxy.test_shutting_down_instance import _Decode, _Stopping
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_hardening import SECRET, Prefill

RECOMPUTED = 'pdlaunch_proxy_legs_retried_total{reason="recompute",role="prefill"} 1.0'
GONE = ("refused", "dropped", "shutting_down")


@contextmanager
def _prefill(kind: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(the prefill's URL, the legs it read): one that refuses the connection (nothing listens), drops it after
    reading the leg, or answers 503 shutting_down; the two latter answer /health ok."""
    if kind == "refused":
        yield f"http://127.0.0.1:{PortAllocator('127.0.0.1').free('nothing listens')}", []
    elif kind == "dropped":
        bodies: list[dict[str, Any]] = []
        with _dropping(bodies) as url:
            yield url, bodies
    else:
        stopping = _Stopping()
        with ThreadServer(stopping.app, PortAllocator("127.0.0.1").free("stopping prefill")) as server:
            yield server.url, stopping.bodies


@contextmanager
def _deployment(prefill_url: str, decode: _Decode, policy: str, prefill_state: str = "ready") -> Iterator[
        tuple[str, InstancePool]]:
    """The proxy (its URL, its pool) in front of the one prefill at `prefill_url` and `decode`, under
    load_failure_policy `policy`. Each instance is probed once, then the prefill is put in `prefill_state` (ready: as
    its last probe before it went saw it), so what the request finds is what the test made, not a probe's word."""
    ports = PortAllocator("127.0.0.1")
    with ExitStack() as stack, pytest.MonkeyPatch.context() as patch:
        patch.setattr(instances, "HEALTH_INTERVAL_S", 3600.0)
        patch.setattr(instances, "STARTING_INTERVAL_S", 3600.0)
        d = stack.enter_context(ThreadServer(decode.app, ports.free("decode")))
        pool = InstancePool([Instance("prefill", prefill_url, "prefill-0"), Instance("decode", d.url, "decode-0")])
        probes_over = first_probes_over(pool, patch)
        app = build_proxy_app(pool, 60.0, deployment_secret=SECRET, load_failure_policy=policy)
        proxy = stack.enter_context(ThreadServer(app, ports.free("proxy")))
        # every first probe over, the refusing prefill's too: one that ended later would set its state again
        wait_for(probes_over, "the proxy's first probes of each instance", 30)
        assert pool.instances[1].state == "ready", pool.instances[1]
        pool.instances[0].state = prefill_state
        yield proxy.url, pool


def _post(url: str, stream: bool) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": "go", "max_tokens": 4, "stream": stream}, timeout=30)


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def _computed_by_the_decode(answer: httpx.Response, decode: _Decode, url: str) -> None:
    assert answer.status_code == 200, answer.text
    assert '"done"' in answer.text and '"error"' not in answer.text, answer.text
    assert len(decode.bodies) == 1
    assert "kv_transfer_params" not in decode.bodies[0]  # the client's request, as a short prompt's
    assert decode.bodies[0]["prompt"] == "go" and decode.bodies[0]["max_tokens"] == 4
    metrics = _metrics(url)
    assert RECOMPUTED in metrics, metrics
    # no other prefill to retry on (the series is there from the start, at 0)
    assert 'pdlaunch_proxy_legs_retried_total{reason="instance_gone",role="prefill"} 0.0' in metrics


def _refused_naming_the_policy(answer: httpx.Response, decode: _Decode) -> str:
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "no_instance", error
    assert 1 <= int(answer.headers["retry-after"]) <= 60
    message: str = error["message"]
    assert "prefill-0" in message and "kv_transfer.load_failure_policy" in message and "recompute" in message, message
    assert decode.bodies == []
    return message


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", GONE)
def test_with_no_other_prefill_the_decode_computes_the_prompt_of_a_gone_prefill(kind: str, stream: bool) -> None:
    decode = _Decode()
    with _prefill(kind) as (prefill_url, legs), _deployment(prefill_url, decode, "recompute") as (url, pool):
        answer = _post(url, stream)
        _computed_by_the_decode(answer, decode, url)
        assert len(legs) == (0 if kind == "refused" else 1)  # the leg went there first
        assert pool.instances[0].state == "down"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", GONE)
def test_under_policy_fail_a_gone_prefill_without_another_is_a_503_naming_the_policy(kind: str, stream: bool) -> None:
    decode = _Decode()
    with _prefill(kind) as (prefill_url, _), _deployment(prefill_url, decode, "fail") as (url, _pool):
        message = _refused_naming_the_policy(_post(url, stream), decode)
        assert "gone" in message or "unreachable" in message or "closed the connection" in message, message
        assert RECOMPUTED.rsplit(" ", 1)[0] + " 0.0" in _metrics(url)  # the series is there from the start, at 0


@pytest.mark.parametrize("stream", [False, True])
def test_with_no_prefill_ready_at_arrival_the_decode_computes_the_prompt(stream: bool) -> None:
    decode = _Decode()
    with _prefill("refused") as (prefill_url, _), \
            _deployment(prefill_url, decode, "recompute", prefill_state="down") as (url, _pool):
        _computed_by_the_decode(_post(url, stream), decode, url)


@pytest.mark.parametrize("stream", [False, True])
def test_under_policy_fail_no_prefill_ready_at_arrival_is_a_503_naming_the_policy(stream: bool) -> None:
    decode = _Decode()
    with _prefill("refused") as (prefill_url, _), \
            _deployment(prefill_url, decode, "fail", prefill_state="down") as (url, _pool):
        message = _refused_naming_the_policy(_post(url, stream), decode)
        assert "no prefill instance is ready (prefill-0 down" in message, message


def test_while_no_prefill_is_ready_the_fallback_is_said_once_and_a_ready_prefill_ends_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """A prefill's restart would otherwise log a WARNING per request: the first says it, later ones log at DEBUG, and
    the prefill ready again is said at INFO; its requests go PD again."""
    prefill, decode = Prefill(), _Decode()
    with ThreadServer(prefill.app, PortAllocator("127.0.0.1").free("prefill")) as p, \
            _deployment(p.url, decode, "recompute", prefill_state="down") as (url, pool), \
            caplog.at_level(logging.DEBUG, logger="pdlaunch.proxy"):
        for stream in (False, True):
            assert _post(url, stream).status_code == 200
        said = [r for r in caplog.records if "no prefill instance is ready" in r.getMessage()]
        assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG], [r.getMessage() for r in said]
        assert 'reason="recompute",role="prefill"} 2.0' in _metrics(url)
        pool.instances[0].state = "ready"
        assert _post(url, False).status_code == 200
        assert decode.bodies[2]["kv_transfer_params"]["remote_request_id"] == prefill.legs[0]
        assert any(r.levelno == logging.INFO and "prefill-0 is ready again" in r.getMessage()
                   and "2 computed by decodes" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("policy", "code"), [("recompute", 200), ("fail", 503)])
def test_the_proxys_health_while_a_ready_deployments_prefill_is_down(policy: str, code: int) -> None:
    """Under recompute the decode answers every request, so the proxy stays ready (a Kubernetes readiness probe would
    otherwise take it out of its Service while a prefill pod restarts), saying it is degraded; under fail it is not."""
    prefill, decode = Prefill(), _Decode()
    with ThreadServer(prefill.app, PortAllocator("127.0.0.1").free("prefill")) as p, \
            _deployment(p.url, decode, policy, prefill_state="down") as (url, pool):
        assert pool.been_ready  # both instances answered their first probes
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == code, health.text
        if code == 200:
            assert health.json()["status"] == "ok" and "decodes compute the prompts" in health.json()["degraded"]
            assert _post(url, False).status_code == 200
        else:
            assert "no ready prefill instance" in health.text
        pool.instances[0].state = "ready"
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 200 and "degraded" not in health.json(), health.text


def test_the_proxys_health_waits_for_a_prefill_before_the_deployment_was_first_ready() -> None:
    """Before every role has been ready once (a deployment starting), a decode alone does not make the proxy ready,
    whatever the policy: the launcher's start and the tests wait for the whole deployment."""
    decode = _Decode()
    with _prefill("refused") as (prefill_url, _), \
            _deployment(prefill_url, decode, "recompute", prefill_state="down") as (url, pool):
        assert not pool.been_ready
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and "no ready prefill instance" in health.text, health.text


def test_a_second_outage_is_said_again_though_no_pd_request_came_between(caplog: pytest.LogCaptureFixture) -> None:
    """A prefill ready again between two outages, with no request to run a prefill leg meanwhile (an idle time): the
    second outage's first request warns again, after a line that the first one ended."""
    prefill, decode = Prefill(), _Decode()
    with ThreadServer(prefill.app, PortAllocator("127.0.0.1").free("prefill")) as p, \
            _deployment(p.url, decode, "recompute", prefill_state="down") as (url, pool), \
            caplog.at_level(logging.DEBUG, logger="pdlaunch.proxy"):
        assert _post(url, False).status_code == 200
        pool._answered(pool.instances[0], {"status": "ok"})  # its probe: ready again
        pool.instances[0].state = "down"  # and gone again before any request
        assert _post(url, False).status_code == 200
        said = [r for r in caplog.records if "no prefill instance is ready" in r.getMessage()]
        assert [r.levelno for r in said] == [logging.WARNING, logging.WARNING], [r.getMessage() for r in said]
        assert any("was ready again meanwhile (1 requests" in r.getMessage() for r in caplog.records)
