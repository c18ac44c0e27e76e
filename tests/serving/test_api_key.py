"""API key and internal token (http/auth.py) at a real instance and at the proxy in front of it.

The instance and the proxy get different client keys on purpose: the proxy's legs are accepted
only because they carry the internal token derived from the shared deployment secret.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.http.auth import INTERNAL_TOKEN_HEADER, internal_headers
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.serving.helpers import ThreadServer, in_process_instance, wait_for

SECRET = "api-key-test-secret-0123456789"
INSTANCE_KEY = "sk-instance"
PROXY_KEY = "sk-proxy"
COMPLETION = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def instance() -> Iterator[str]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": 512}, "cache": {"num_gpu_blocks": 64},
        "security": {"api_key": INSTANCE_KEY, "deployment_secret": SECRET},
    })
    with in_process_instance(cfg, "test-api-key-0", max_pending_requests=16) as (url, _):
        yield url


def proxy_in_front(instance_url: str, api_key: str | None) -> ThreadServer:
    pool = InstancePool([Instance(role="colocated", url=instance_url, name="colocated-0")])
    app = build_proxy_app(pool, 60.0, api_key=api_key, deployment_secret=SECRET)
    return ThreadServer(app, PortAllocator("127.0.0.1").free("test proxy"))


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key" and error["message"]


def test_instance_needs_the_key_everywhere_but_health(instance: str) -> None:
    assert httpx.get(f"{instance}/health").status_code == 200
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/info"), ("GET", "/metrics"),
                         ("POST", "/sleep"), ("GET", "/is_sleeping"), ("GET", "/no/such/route")):
        assert_401(httpx.request(method, f"{instance}{path}", json=COMPLETION))
        assert_401(httpx.request(method, f"{instance}{path}", json=COMPLETION, headers=bearer("sk-wrong")))
    no_scheme = httpx.post(f"{instance}/v1/completions", json=COMPLETION, headers={"Authorization": INSTANCE_KEY})
    assert_401(no_scheme)  # the right key without `Bearer ` was answered "invalid API key"
    assert no_scheme.json()["error"]["message"].startswith("the Authorization header is not `Bearer KEY`: send ")
    assert httpx.get(f"{instance}/info", headers=bearer("sk-wrong")).json()["error"]["message"].startswith(
        "invalid API key")
    assert httpx.post(f"{instance}/v1/completions", json=COMPLETION, headers=bearer(INSTANCE_KEY),
                      timeout=60).status_code == 200
    assert httpx.get(f"{instance}/info", headers=internal_headers(SECRET)).json()["role"] == "colocated"
    # Past authentication, the control routes answer for themselves (sleep mode is off here).
    slept = httpx.post(f"{instance}/sleep", headers=bearer(INSTANCE_KEY))
    assert slept.status_code == 400 and slept.json()["error"]["code"] == "sleep_mode_disabled"


def test_internal_routes_take_only_the_internal_token(instance: str) -> None:
    body = {"request_id": "never-held"}
    forged = ({}, bearer(INSTANCE_KEY), {INTERNAL_TOKEN_HEADER: "0" * 64}, internal_headers("another-secret-123456"))
    for headers in forged:
        refused = httpx.post(f"{instance}/internal/kv/release", json=body, headers=headers)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "internal_only"
    answer = httpx.post(f"{instance}/internal/kv/release", json=body, headers=internal_headers(SECRET), timeout=30)
    assert answer.status_code == 200 and answer.json() == {"request_id": "never-held", "released": False}
    bad = httpx.post(f"{instance}/internal/kv/release", json={"request_id": 5}, headers=internal_headers(SECRET))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "request_id"
    by_client = httpx.post(f"{instance}/internal/kv/release", json={"client_request_id": "pd-nobody"},
                           headers=internal_headers(SECRET), timeout=30)
    assert by_client.status_code == 200 and by_client.json() == {"client_request_id": "pd-nobody", "released": 0}
    for body in ({}, {"request_id": "a", "client_request_id": "b"}):
        bad = httpx.post(f"{instance}/internal/kv/release", json=body, headers=internal_headers(SECRET))
        assert bad.status_code == 400 and "exactly one of request_id and client_request_id" in bad.text, bad.text


def test_proxy_key_and_internal_token_to_instances(instance: str) -> None:
    with proxy_in_front(instance, PROXY_KEY) as proxy:
        wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see the instance")
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/metrics"),
                             ("GET", "/instances"), ("POST", "/sleep"), ("POST", "/wake_up")):
            assert_401(httpx.request(method, f"{proxy.url}{path}", json=COMPLETION))
        assert_401(httpx.post(f"{proxy.url}/v1/completions", json=COMPLETION, headers=bearer(INSTANCE_KEY)))
        answer = httpx.post(f"{proxy.url}/v1/completions", json=COMPLETION, headers=bearer(PROXY_KEY), timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
        assert INTERNAL_TOKEN_HEADER.lower() not in answer.headers  # the token never goes back to a client
        models = httpx.get(f"{proxy.url}/v1/models", headers=bearer(PROXY_KEY))
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiny"
        fanned = httpx.post(f"{proxy.url}/sleep", headers=bearer(PROXY_KEY), timeout=30)
        assert fanned.status_code == 400  # reached the instance, which has no sleep mode
        assert fanned.json()["instances"][0]["body"]["error"]["code"] == "sleep_mode_disabled"
        metrics = httpx.get(f"{proxy.url}/metrics", headers=bearer(PROXY_KEY)).text
        assert 'route="/v1/completions",status="401"' in metrics


def test_proxy_without_a_key_keeps_openai_open_but_refuses_control(instance: str) -> None:
    with proxy_in_front(instance, None) as proxy:
        wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see the instance")
        assert httpx.post(f"{proxy.url}/v1/completions", json=COMPLETION, timeout=60).status_code == 200
        for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
            refused = httpx.request(method, f"{proxy.url}{path}")
            assert refused.status_code == 403 and "--api-key" in refused.json()["error"]["message"]
