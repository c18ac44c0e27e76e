"""kv_transfer.load_failure_policy through real instances (tiny model, real NIXL on CPU, this process):
with recompute the client gets what one instance alone answers when the KV cannot be loaded (injected
transfer failure, killed prefill); with fail a clear 502; no block stays held anywhere."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from pdlaunch.server.app import build_app
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_vllm_proxies import _instance

PROMPT = "When the prefill instance is gone, the decode instance computes this prompt on its own"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[dict[str, Any], dict[str, EngineLoop]]]:
    servers: dict[str, Any] = {}
    loops: dict[str, EngineLoop] = {}
    try:
        for role in ("prefill", "decode"):
            cfg, spec, loop = _instance(role)
            loops[role] = loop
            servers[role] = ThreadServer(build_app(loop, cfg, spec), spec.port).__enter__()
            url = servers[role].url
            wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, f"the {role} engine", 180)
        yield servers, loops
    finally:
        for srv in servers.values():
            if srv is not None:
                srv.__exit__(None, None, None)


def _post(url: str, prompt: str, kv: Any = None, max_tokens: int = 6) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    if kv is not None:
        body["kv_transfer_params"] = kv
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def _recomputes() -> float:
    return REGISTRY.get_sample_value("pdlaunch_kv_load_recomputes_total") or 0.0


def _idle(*urls: str) -> None:
    for url in urls:
        wait_for(lambda: httpx.get(f"{url}/info").json()["num_blocks_used"] == 0, f"{url} to hold 0 blocks", 30)


def test_injected_transfer_failure_is_recomputed_or_fails_clearly(pair: Any) -> None:
    servers, loops = pair
    prefill, decode = servers["prefill"].url, servers["decode"].url
    faults = loops["decode"].engine.connector.receiver.faults
    faults.rate = 1.0  # PDLAUNCH_TEST_FAIL_TRANSFER_RATE=1.0
    try:
        for policy, prompt in (("recompute", PROMPT + " (injected)"), ("fail", PROMPT + " (injected, fail)")):
            loops["decode"].engine.scheduler.recompute_failed_loads = policy == "recompute"
            alone = _post(prefill, prompt).json()["choices"][0]["text"]
            params = _post(prefill, prompt, {"do_remote_decode": True}, max_tokens=1).json()["kv_transfer_params"]
            before = _recomputes()
            r = _post(decode, prompt, params)
            if policy == "recompute":
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone, r.text
                assert _recomputes() == before + 1
            else:
                assert r.status_code == 502, r.text
                assert "injected by PDLAUNCH_TEST_FAIL_TRANSFER_RATE" in r.json()["error"]["message"]
            _idle(prefill, decode)
    finally:
        faults.rate = 0.0
        loops["decode"].engine.scheduler.recompute_failed_loads = True


@pytest.mark.slow
def test_killed_prefill_between_the_legs(pair: Any) -> None:
    servers, loops = pair
    prefill, decode = servers["prefill"].url, servers["decode"].url
    prompts = {policy: f"{PROMPT} ({policy} after a kill)" for policy in ("recompute", "fail")}
    alone = {p: _post(prefill, prompt).json()["choices"][0]["text"] for p, prompt in prompts.items()}
    params = {p: _post(prefill, prompt, {"do_remote_decode": True}, max_tokens=1).json()["kv_transfer_params"]
              for p, prompt in prompts.items()}
    servers["prefill"].__exit__(None, None, None)  # the prefill process is gone: its side channel with it
    servers["prefill"] = None
    r = _post(decode, prompts["recompute"], params["recompute"])
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone["recompute"], r.text
    loops["decode"].engine.scheduler.recompute_failed_loads = False
    try:
        r = _post(decode, prompts["fail"], params["fail"])
    finally:
        loops["decode"].engine.scheduler.recompute_failed_loads = True
    assert r.status_code == 502 and "KV transfer failed" in r.json()["error"]["message"], r.text
    _idle(decode)
