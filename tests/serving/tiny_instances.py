"""A tiny-model instance served in this process (real engine, real NIXL on CPU) for the PD counting tests: prefill
and decode pull KV from each other under one deployment secret."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.server.app import build_app
from pdlaunch.server.engine_loop import EngineLoop
from tests.kv_transfer.deployment_secret import TEST_SECRET
from tests.serving.helpers import ThreadServer, wait_for

TIMEOUT = 180.0  # a loaded 2-core machine
MODEL = "tiny"  # the served model name: the model_name label of the instances' vllm:* series


def tiny_config(**kv_transfer: Any) -> DeploymentConfig:
    """A 1P1D CPU deployment of the tiny model, pull mode, a 30 s lease; `kv_transfer` adds to its kv_transfer."""
    return DeploymentConfig.model_validate({
        "device": "cpu", "instances": [{"role": "prefill"}, {"role": "decode"}],
        "model": {"path": MODEL, "max_model_len": 256}, "cache": {"num_gpu_blocks": 64, "block_size": 8},
        "kv_transfer": {"transfer_mode": "pull", "kv_lease_seconds": 30.0, **kv_transfer},
        "security": {"deployment_secret": TEST_SECRET},
    })


def serve_tiny(role: str, name: str, **kv_transfer: Any) -> tuple[ThreadServer, EngineLoop]:
    """An instance of `role` (engine id `name`) served on a free port, once /health answers."""
    cfg = tiny_config(**kv_transfer)
    spec = InstanceSpec(role=role, port=PortAllocator("127.0.0.1").free(f"test {name}"), engine_id=name, device="cpu")
    loop = EngineLoop(lambda: LLMEngine(cfg, spec), max_pending_requests=16)
    srv = ThreadServer(build_app(loop, cfg, spec), spec.port).__enter__()
    wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 200, f"the {name} engine", TIMEOUT)
    return srv, loop


@dataclass
class TinyPD:
    prefill: str
    decode: str
    proxy: str
    loops: list[EngineLoop]  # the prefill's, then the decode's


def prefill_leg(pd: TinyPD, prompt: list[int]) -> dict[str, Any]:
    """The prefill's kv_transfer_params for a leg of `prompt` as the proxy sends it; its hold waits for a decode."""
    leg = httpx.post(f"{pd.prefill}/v1/completions", timeout=TIMEOUT, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
        "kv_transfer_params": {"do_remote_decode": True, "return_first_token": True}})
    assert leg.status_code == 200, leg.text
    params: dict[str, Any] = leg.json()["kv_transfer_params"]
    return params


@contextmanager
def tiny_pd(tag: str, **kv_transfer: Any) -> Iterator[TinyPD]:
    """A tiny prefill and decode (engine ids `tag`-prefill, `tag`-decode) behind the real proxy, in this process;
    stopped on exit, the proxy first. `kv_transfer` adds to both instances' kv_transfer (tiny_config)."""
    servers: list[ThreadServer] = []
    loops: list[EngineLoop] = []
    try:
        for role in ("prefill", "decode"):
            srv, loop = serve_tiny(role, f"{tag}-{role}", **kv_transfer)
            servers.append(srv)
            loops.append(loop)
        pool = InstancePool([Instance("prefill", servers[0].url, "prefill-0"),
                             Instance("decode", servers[1].url, "decode-0")])
        proxy = ThreadServer(build_proxy_app(pool, 120.0, deployment_secret=TEST_SECRET),
                             PortAllocator("127.0.0.1").free("proxy")).__enter__()
        servers.append(proxy)
        wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see both instances")
        yield TinyPD(servers[0].url, servers[1].url, proxy.url, loops)
    finally:
        for srv in reversed(servers):
            srv.__exit__(None, None, None)
