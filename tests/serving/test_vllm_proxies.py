"""vLLM's pull and push proxies (stand-ins: vllm_proxy_standins.py) drive our prefill and decode instances
unmodified: completions and chat, streamed and not, answer what one instance alone answers, KV moves,
and no block stays held. Params without our signature (push) reach only the deployment's prefills, and
only for the decode's own prompt. Instances run in this process on the tiny model with real NIXL (CPU)."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.http.auth import internal_headers
from pdlaunch.http.sse import parse_sse
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.server.app import build_app
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.internal import KV_RELEASE_PATH
from tests.kv_transfer.deployment_secret import TEST_SECRET
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.vllm_proxy_standins import vllm_proxy_app

PROMPT = "The capital of France is a city that many people visit every year, and its museums"
MESSAGES = [{"role": "user", "content": "Name three colors, and say why the sky looks blue to us."}]
LOOPS: dict[str, EngineLoop] = {}


def _instance(role: str) -> tuple[DeploymentConfig, InstanceSpec, EngineLoop]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "instances": [{"role": "prefill"}, {"role": "decode"}],
        "model": {"path": "tiny", "max_model_len": 512}, "cache": {"num_gpu_blocks": 96, "block_size": 8},
        "kv_transfer": {"transfer_mode": "pull", "kv_lease_seconds": 30.0, "transfer_timeout_seconds": 8.0,
                        "handshake_timeout_seconds": 4.0},
        "security": {"deployment_secret": TEST_SECRET},
    })
    port = PortAllocator("127.0.0.1").free(f"test {role}")
    spec = InstanceSpec(role=role, port=port, engine_id=f"vllm-proxies-{role}", device="cpu")
    return cfg, spec, EngineLoop(lambda: LLMEngine(cfg, spec), max_pending_requests=16)


@pytest.fixture(scope="module")
def pair() -> Iterator[dict[str, str]]:
    servers = []
    try:
        for role in ("prefill", "decode"):
            cfg, spec, loop = _instance(role)
            LOOPS[role] = loop
            srv = ThreadServer(build_app(loop, cfg, spec), spec.port).__enter__()
            servers.append(srv)
            wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 200, f"the {role} engine", 180)
        # What the launcher tells a decode (PDLAUNCH_PREFILL_SIDE_CHANNELS): the prefill's side channel.
        LOOPS["decode"].engine._prefill_side_channels = frozenset(
            {LOOPS["prefill"].engine.connector.side_channel_address})
        urls = {"prefill": servers[0].url, "decode": servers[1].url}
        ports = PortAllocator("127.0.0.1")
        for mode in ("pull", "push"):
            app = vllm_proxy_app(mode, [urls["prefill"]], [urls["decode"]])  # type: ignore[arg-type]
            srv = ThreadServer(app, ports.free(f"{mode} proxy")).__enter__()
            servers.append(srv)
            urls[mode] = srv.url
        yield urls
    finally:
        for srv in reversed(servers):
            srv.__exit__(None, None, None)
        # Drop the engines (and their NIXL agents) with the module, not at interpreter exit.
        LOOPS.clear()
        gc.collect()


def _body(chat: bool, stream: bool, tag: str = "", **extra: Any) -> dict[str, Any]:
    """`tag` makes the prompt unique: the decode's prefix cache would otherwise make the KV load moot."""
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, **extra}
    messages = [{"role": "user", "content": MESSAGES[0]["content"] + tag}]
    body.update({"messages": messages} if chat else {"prompt": PROMPT + tag})
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def _text(response: httpx.Response, chat: bool, stream: bool) -> str:
    assert response.status_code == 200, response.text
    if not stream:
        choice = response.json()["choices"][0]
        return choice["message"]["content"] if chat else choice["text"]
    chunks = [json.loads(e) for e in parse_sse(response.content) if e != "[DONE]"]
    assert not any("error" in c for c in chunks), chunks
    return "".join((c["choices"][0]["delta"].get("content") or "") if chat else c["choices"][0]["text"]
                   for c in chunks if c.get("choices"))


def _post(url: str, body: dict[str, Any], chat: bool) -> httpx.Response:
    return httpx.post(f"{url}/v1/{'chat/completions' if chat else 'completions'}", json=body, timeout=120)


def _kv_bytes() -> float:
    return REGISTRY.get_sample_value("pdlaunch_kv_transfer_bytes_total") or 0.0


def _idle(urls: dict[str, str]) -> None:
    for role in ("prefill", "decode"):
        wait_for(lambda: httpx.get(f"{urls[role]}/info").json()["num_blocks_used"] == 0,
                 f"the {role} to hold 0 KV blocks", 30)


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_vllm_proxy_answers_as_one_instance(pair: dict[str, str], mode: str, chat: bool, stream: bool) -> None:
    tag = f" ({mode}, {chat}, {stream})"
    alone = _text(_post(pair["prefill"], _body(chat, False, tag), chat), chat, False)  # no KV params: computed here
    moved = _kv_bytes()
    through = _text(_post(pair[mode], _body(chat, stream, tag, min_tokens=4), chat), chat, stream)
    assert through == alone and len(alone) > 0
    assert _kv_bytes() > moved, "no KV moved from the prefill to the decode"
    _idle(pair)


def test_prefill_answer_carries_vllms_fields(pair: dict[str, str]) -> None:
    body = _body(False, False, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    params = _post(pair["prefill"], body, False).json()["kv_transfer_params"]
    assert params["transfer_mode"] == "pull" and params["tp_size"] == 1
    assert params["remote_num_tokens"] == params["num_prompt_tokens"] > 8
    assert params["remote_blocks_expiry_time"] == pytest.approx(params["expires_at"], abs=2)
    release(pair, params)


def release(pair: dict[str, str], params: dict[str, Any]) -> None:
    r = httpx.post(f"{pair['prefill']}{KV_RELEASE_PATH}", json={"request_id": params["remote_request_id"]},
                   headers=internal_headers(TEST_SECRET), timeout=30)
    assert r.status_code == 200, r.text
    _idle(pair)


def _push_params(params: dict[str, Any], **change: Any) -> dict[str, Any]:
    keep = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port", "tp_size")
    return {"do_remote_prefill": True, "do_remote_decode": False, **{k: params[k] for k in keep}, **change}


def test_unsigned_params_to_an_address_outside_the_deployment_are_refused(pair: dict[str, str]) -> None:
    body = _body(False, False, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    params = _post(pair["prefill"], body, False).json()["kv_transfer_params"]
    for host, port in (("192.0.2.1", params["remote_port"]), (params["remote_host"], 1)):
        r = _post(pair["decode"], _body(False, False, kv_transfer_params=_push_params(
            params, remote_host=host, remote_port=port)), False)
        assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params.remote_host", r.text
    release(pair, params)


@pytest.mark.slow
def test_naming_another_prompts_request_gets_none_of_its_kv(pair: dict[str, str]) -> None:
    """A client who learnt a held request id sends its own prompt with it: the prefill gives no block
    ids for another prompt, the decode computes the client's prompt itself (recompute policy), and the
    held request is untouched."""
    body = _body(False, False, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    victim = _post(pair["prefill"], body, False).json()["kv_transfer_params"]
    other = {**_body(False, False), "prompt": "A completely different prompt about the ocean and its tides"}
    alone = _text(_post(pair["prefill"], other, False), False, False)
    attack = _post(pair["decode"], {**other, "kv_transfer_params": _push_params(victim)}, False)
    assert _text(attack, False, False) == alone
    assert attack.json()["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) == 0
    assert httpx.get(f"{pair['prefill']}/info").json()["num_blocks_used"] > 0  # still held for its own decode
    release(pair, victim)


def test_decode_leg_first_without_request_id_waits_for_the_prefill(pair: dict[str, str]) -> None:
    """A proxy that sends both legs at once knows the prefill's address but not its request id: the
    decode finds the held request by the X-Request-Id both legs share, once the prefill holds it."""
    import threading

    body = _body(False, False, " (both legs)", max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    params = _post(pair["prefill"], _body(False, False, max_tokens=1, kv_transfer_params={"do_remote_decode": True}),
                   False).json()["kv_transfer_params"]
    release(pair, params)
    alone = _text(_post(pair["prefill"], _body(False, False, " (both legs)"), False), False, False)
    headers = {"X-Request-Id": "both-legs-1"}
    decode_params = {k: v for k, v in _push_params(params).items() if k != "remote_request_id"}
    result: dict[str, httpx.Response] = {}

    def decode_leg() -> None:
        result["decode"] = httpx.post(f"{pair['decode']}/v1/completions", headers=headers, timeout=120,
                                      json=_body(False, False, " (both legs)", kv_transfer_params=decode_params))

    thread = threading.Thread(target=decode_leg)
    moved = _kv_bytes()
    thread.start()
    prefill = httpx.post(f"{pair['prefill']}/v1/completions", json=body, headers=headers, timeout=120)
    thread.join(60)
    assert prefill.status_code == 200 and _text(result["decode"], False, False) == alone
    assert _kv_bytes() > moved
    _idle(pair)
