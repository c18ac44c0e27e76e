"""Issue 14 item 1 through real instances over HTTP: a prefill and a decode instance (demo model, real
NIXL on CPU) in this process. Bad, forged or expired kv_transfer_params get a 400 naming the field, and
both instances keep serving with no KV blocks left held."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.server.app import build_app
from pdlaunch.server.engine_loop import EngineLoop
from tests.kv_transfer.deployment_secret import TEST_SECRET, signed
from tests.serving.helpers import ThreadServer, wait_for

PROMPT = "The capital of France is"


def _instance(role: str) -> tuple[DeploymentConfig, InstanceSpec, EngineLoop]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "instances": [{"role": "prefill"}, {"role": "decode"}],
        "model": {"path": "tiny", "max_model_len": 512}, "cache": {"num_gpu_blocks": 64, "block_size": 8},
        "kv_transfer": {"transfer_mode": "pull", "kv_lease_seconds": 30.0, "load_failure_policy": "fail"},
        "security": {"deployment_secret": TEST_SECRET},
    })
    port = PortAllocator("127.0.0.1").free(f"test {role}")
    spec = InstanceSpec(role=role, port=port, engine_id=f"params-http-{role}", device="cpu")
    return cfg, spec, EngineLoop(lambda: LLMEngine(cfg, spec), max_pending_requests=16)


LOOPS: dict[str, EngineLoop] = {}


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[str, str]]:
    servers = []
    try:
        for role in ("prefill", "decode"):
            cfg, spec, loop = _instance(role)
            LOOPS[role] = loop
            srv = ThreadServer(build_app(loop, cfg, spec), spec.port).__enter__()
            servers.append(srv)
            wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 200, f"the {role} engine", 180)
        yield servers[0].url, servers[1].url
    finally:
        for srv in servers:
            srv.__exit__(None, None, None)


def _post(url: str, kv: Any, max_tokens: int = 2) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "kv_transfer_params": kv}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def _prefill(url: str) -> dict[str, Any]:
    r = _post(url, {"do_remote_decode": True}, max_tokens=1)
    assert r.status_code == 200, r.text
    return r.json()["kv_transfer_params"]


def _healthy_and_idle(*urls: str) -> None:
    for url in urls:
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        wait_for(lambda: httpx.get(f"{url}/info").json()["num_blocks_used"] == 0, f"{url} to hold 0 KV blocks", 60)


ISSUE_PARAMS = {"do_remote_prefill": True, "remote_engine_id": "x", "remote_block_ids": 5,
                "remote_host": "127.0.0.1", "remote_port": 1, "remote_request_id": "r"}


@pytest.mark.parametrize("change, field", [
    ({}, "kv_transfer_params.remote_block_ids"),  # the issue's crash: len() of an int in the engine step
    ({"remote_block_ids": [[1, 2]], "tp_size": "abc"}, "kv_transfer_params.tp_size"),
    ({"remote_block_ids": [[1, 2]], "remote_port": 70000}, "kv_transfer_params.remote_port"),
    ({"remote_block_ids": [[1, 2]], "do_remote_prefill": "yes"}, "kv_transfer_params.do_remote_prefill"),
    ({"remote_block_ids": [[1, 2]]}, "kv_transfer_params.signature"),  # well formed, not signed
])
def test_bad_params_get_400_naming_the_field(pair: tuple[str, str], change: dict[str, Any], field: str) -> None:
    prefill, decode = pair
    r = _post(decode, {**ISSUE_PARAMS, **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"]
    _healthy_and_idle(prefill, decode)


def test_forged_and_expired_params_are_refused_and_real_ones_served(pair: tuple[str, str]) -> None:
    prefill, decode = pair
    real = _prefill(prefill)
    assert real["signature"] and real["expires_at"] <= time.time() + 30 + 1
    forged = copy.deepcopy(real)
    forged["remote_host"] = "192.0.2.1"  # point the decode elsewhere: the signature no longer matches
    r = _post(decode, forged)
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params.signature"
    made_up = {**real, "signature": "00" * 32}
    assert _post(decode, made_up).json()["error"]["param"] == "kv_transfer_params.signature"
    other_secret = signed({k: v for k, v in real.items() if k not in ("signature", "expires_at")},
                          secret="another-deployment-secret-0123")
    assert _post(decode, other_secret).json()["error"]["param"] == "kv_transfer_params.signature"
    expired = signed({k: v for k, v in real.items() if k not in ("signature", "expires_at")},
                     lease_seconds=30.0, now=time.time() - 120)
    r = _post(decode, expired)
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params.expires_at"
    # The genuine answer still works: the refusals neither crashed nor used up anything.
    moved_before = REGISTRY.get_sample_value("pdlaunch_kv_transfer_bytes_total") or 0.0
    r = _post(decode, real, max_tokens=4)
    assert r.status_code == 200, r.text
    # The KV came over (cached_tokens counts prefix-cache hits only, so it cannot tell).
    assert (REGISTRY.get_sample_value("pdlaunch_kv_transfer_bytes_total") or 0.0) > moved_before
    # The same params again: the prefill freed those blocks after the first read; a clean error.
    again = _post(decode, real)
    assert again.status_code in (200, 502), again.text
    _healthy_and_idle(prefill, decode)


def test_release_held_kv_frees_the_prefill_at_once(pair: tuple[str, str]) -> None:
    """The internal route (server/internal.py) reaches EngineLoop.release_held_kv: the blocks go now,
    not at the end of the 30 s lease."""
    from pdlaunch.http.auth import internal_headers
    from pdlaunch.server.internal import KV_RELEASE_PATH

    prefill, decode = pair
    real = _prefill(prefill)
    assert httpx.get(f"{prefill}/info").json()["num_blocks_used"] > 0
    started = time.monotonic()
    r = httpx.post(f"{prefill}{KV_RELEASE_PATH}", json={"request_id": real["remote_request_id"]}, timeout=30,
                   headers=internal_headers(TEST_SECRET))
    assert r.status_code == 200 and r.json()["released"] is True, r.text
    _healthy_and_idle(prefill)
    assert time.monotonic() - started < 10
    r = _post(decode, real)  # the decode leg after all: a clean error, the decode serves on
    assert r.status_code == 502 and "not held" in r.json()["error"]["message"], r.text
    _healthy_and_idle(prefill, decode)


def test_injected_transfer_failures_give_a_clear_error_and_free_the_prefill(pair: tuple[str, str]) -> None:
    """PDLAUNCH_TEST_FAIL_TRANSFER_RATE (test only) fails a load the way a real failure does: a 502 that
    says why, and the prefill is told to release its blocks at once (not at the end of its lease)."""
    prefill, decode = pair
    faults = LOOPS["decode"].engine.connector.receiver.faults
    faults.rate = 1.0
    try:
        real = _prefill(prefill)
        r = _post(decode, real)
        assert r.status_code == 502, r.text
        assert "injected by PDLAUNCH_TEST_FAIL_TRANSFER_RATE" in r.json()["error"]["message"]
        wait_for(lambda: httpx.get(f"{prefill}/info").json()["num_blocks_used"] == 0,
                 "the prefill to free the failed request's blocks well before its 30 s lease", 10)
    finally:
        faults.rate = 0.0
    _healthy_and_idle(prefill, decode)
    assert _post(decode, _prefill(prefill)).status_code == 200
