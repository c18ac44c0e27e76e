"""POST /internal/kv/forget_engine on real instances (tiny model, real NIXL on CPU, in this process): after a PD
request pushed KV, the prefill forgets the decode's engine and the decode the prefill's, each answering how many
agents went; the route takes only the internal token and a valid body; a request afterwards still works (the
decode shakes hands again, its push loads it again)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.http.auth import internal_headers
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.server.app import build_app
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.internal import KV_FORGET_ENGINE_PATH
from tests.kv_transfer.deployment_secret import TEST_SECRET
from tests.serving.helpers import ThreadServer, wait_for

ENGINE_IDS = {"prefill": "forget-route-P", "decode": "forget-route-D"}
INTERNAL = internal_headers(TEST_SECRET)
PROMPT = "The capital of France is Paris, and the capital of Italy is Rome; the capital of Spain is"  # blocks to move


@pytest.fixture(scope="module")
def pair() -> Iterator[dict[str, str]]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "instances": [{"role": "prefill"}, {"role": "decode"}],
        "model": {"path": "tiny", "max_model_len": 512}, "cache": {"num_gpu_blocks": 64, "block_size": 8},
        "kv_transfer": {"transfer_mode": "push", "load_failure_policy": "fail"},
        "security": {"deployment_secret": TEST_SECRET},
    })
    servers: dict[str, ThreadServer] = {}
    try:
        for role, engine_id in ENGINE_IDS.items():
            spec = InstanceSpec(role=role, port=PortAllocator("127.0.0.1").free(f"test {role}"), engine_id=engine_id,
                                device="cpu")
            loop = EngineLoop(lambda spec=spec: LLMEngine(cfg, spec), max_pending_requests=16)
            server = servers[role] = ThreadServer(build_app(loop, cfg, spec), spec.port).__enter__()
            wait_for(lambda: httpx.get(f"{server.url}/health").status_code == 200, f"the {role} engine", 180)
        yield {role: server.url for role, server in servers.items()}
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)


def _pd_request(urls: dict[str, str]) -> str:
    body: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1,
                            "temperature": 0.0, "kv_transfer_params": {"do_remote_decode": True}}
    prefilled = httpx.post(f"{urls['prefill']}/v1/completions", json=body, timeout=120)
    assert prefilled.status_code == 200, prefilled.text
    decoded = httpx.post(f"{urls['decode']}/v1/completions", timeout=120, json={
        **body, "max_tokens": 4, "kv_transfer_params": prefilled.json()["kv_transfer_params"]})
    assert decoded.status_code == 200, decoded.text
    return str(decoded.json()["choices"][0]["text"])


def _forget(url: str, body: object, headers: dict[str, str] = INTERNAL) -> httpx.Response:
    return httpx.post(f"{url}{KV_FORGET_ENGINE_PATH}", json=body, headers=headers, timeout=30)


def _shows(url: str, key: str, value: object) -> None:
    """/info shows what the engine thread recorded last: wait until its connector's `key` is `value`."""
    wait_for(lambda: httpx.get(f"{url}/info", timeout=10).json()["connector"][key] == value,
             f"{url}/info to show {key} {value!r}", 30)


def test_each_side_forgets_the_other_engine_and_serves_on(pair: dict[str, str]) -> None:
    text = _pd_request(pair)
    _shows(pair["prefill"], "decode_engines", [ENGINE_IDS["decode"]])
    answer = _forget(pair["prefill"], {"engine_id": ENGINE_IDS["decode"]})
    assert answer.status_code == 200 and answer.json() == {"engine_id": ENGINE_IDS["decode"], "forgotten": 1}
    _shows(pair["prefill"], "decode_engines", [])
    answer = _forget(pair["decode"], {"engine_id": ENGINE_IDS["prefill"]})
    assert answer.json() == {"engine_id": ENGINE_IDS["prefill"], "forgotten": 1}
    _shows(pair["decode"], "peers", {})
    assert _forget(pair["prefill"], {"engine_id": ENGINE_IDS["decode"]}).json()["forgotten"] == 0
    assert _forget(pair["prefill"], {"engine_id": "never-seen"}).json()["forgotten"] == 0
    assert _pd_request(pair) == text  # forgotten agents are loaded again by the next handshake and push


def test_the_route_is_internal_and_checks_its_body(pair: dict[str, str]) -> None:
    url = pair["prefill"]
    for headers in ({}, internal_headers("another-secret-123456")):
        refused = _forget(url, {"engine_id": ENGINE_IDS["decode"]}, headers)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "internal_only"
    for body, param in (({}, "engine_id"), ({"engine_id": 5}, "engine_id"), ({"engine_id": ""}, "engine_id"),
                        ({"engine_id": "x" * 513}, "engine_id"), ({"engine_id": "d", "more": 1}, "more")):
        bad = _forget(url, body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (body, bad.text)
