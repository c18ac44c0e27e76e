"""The 503 a client gets while no instance of a role is ready names each one's state with why, and what to do:
during a decode's restart it read only `no decode instance is ready (decode-0 unhealthy)`."""

from __future__ import annotations

import pytest

from pdlaunch.http.errors import OpenAIError
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.unready import health_refusal


def test_each_instance_is_named_with_why_and_what_to_do() -> None:
    pool = InstancePool([
        Instance(role="decode", url="http://127.0.0.1:9000", name="decode-0", state="unhealthy",
                 detail="/health answered 503 (loading)"),
        Instance(role="decode", url="http://127.0.0.1:9001", name="decode-1", state="down",
                 detail="health check failed: ConnectError"),
        Instance(role="decode", url="http://127.0.0.1:9002", name="decode-2", state="starting"),
        Instance(role="prefill", url="http://127.0.0.1:9003", name="prefill-0", state="ready"),
    ])
    with pytest.raises(OpenAIError) as raised:
        pool.pick("decode")
    err = raised.value
    assert (err.status, err.code) == (503, "no_instance")
    assert err.message == ("no decode instance is ready (decode-0 unhealthy: /health answered 503 (loading); "
                           "decode-1 down: health check failed: ConnectError; decode-2 starting); retry with backoff "
                           "(GET /instances shows each instance's state)")
    assert pool.pick("prefill").name == "prefill-0"


def test_a_role_without_instances_says_so() -> None:
    with pytest.raises(OpenAIError, match=r"no colocated instance is ready \(none configured\)"):
        InstancePool([]).pick("colocated")


def test_a_health_refusal_carries_the_state_the_instance_says() -> None:
    assert health_refusal(503, {"status": "loading", "error": {"message": "instance is loading"}}) == (
        "/health answered 503 (loading)")
    assert health_refusal(503, {}) == "/health answered 503"
    # another server's words are not passed on to clients
    assert health_refusal(503, {"status": "<html>maintenance</html>"}) == "/health answered 503"
    assert health_refusal(500, {"status": 3}) == "/health answered 500"
