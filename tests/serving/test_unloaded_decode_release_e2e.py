"""A PD decode request that ends before its KV load started tells its prefill to drop the hold, which frees the
prompt's blocks at once, not at the lease's end (kv_transfer.kv_lease_seconds, 60 s by default). Its load never
started, so no load of the decode's could tell the prefill (the table's abort found none), and nothing did:
- aborted while queued in the decode's scheduler (its client left before a sequence slot or blocks were free);
- ended at admission by the prefill's first token (return_first_token: max_tokens 1, or a stop id), its KV never
  needed;
- refused by the decode's engine (prompt + max_tokens past its max_model_len), with the prefill's signed params or
  with vLLM's push proxy's (no request id nor blocks: the decode asks the prefill to drop what it would have loaded).
Real components in this process: a tiny prefill and decode instance (real engines and servers, NIXL or Mooncake on
CPU); the test sends both legs itself, as a proxy that does not release holds (vLLM's) would. A 600 s lease: what
frees the prefill's blocks within the test's wait is the decode's word.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.kv_transfer.prefill.side import PrefillSide
from pdlaunch.server.engine_loop import EngineLoop
from tests.kv_transfer.mooncake_skip import requires_mooncake
from tests.serving.helpers import held_kv, wait_for
from tests.serving.tiny_instances import MODEL, TIMEOUT, TinyPD, prefill_leg, tiny_pd

pytestmark = pytest.mark.slow

LEASE_S = 600.0  # the prefill's hold must end by the decode's word, never by its lease
WAIT_S = 60.0  # generous for a loaded 2-core machine, and far below the lease
PROMPT = list(range(100, 140))  # 40 token ids: 5 blocks of 8


@pytest.fixture(scope="module", params=["nixl", pytest.param("mooncake", marks=requires_mooncake)])
def deployment(request: pytest.FixtureRequest) -> Iterator[TinyPD]:
    with tiny_pd(f"unloaded-{request.param}", connector=request.param, kv_lease_seconds=LEASE_S) as pd:
        yield pd


def _held_leg(pd: TinyPD) -> tuple[dict[str, Any], tuple[int, int]]:
    """A prefill leg's signed params (with its first token), which the prefill holds the prompt's KV for, and the
    prefill's (held requests, used blocks) before it (a hold an earlier test failed to end stays)."""
    before = held_kv(pd.prefill)
    params = prefill_leg(pd, PROMPT)
    assert held_kv(pd.prefill)[0] == before[0] + 1 and params["first_token_ids"]
    return params, before


def _released(pd: TinyPD, before: tuple[int, int]) -> None:
    wait_for(lambda: held_kv(pd.prefill) == before, "the prefill to drop its hold (its lease is 600 s)", WAIT_S)


def test_a_decode_request_aborted_while_queued_releases_the_prefill(deployment: TinyPD) -> None:
    params, before = _held_leg(deployment)
    decode: EngineLoop = deployment.loops[1]

    def add_and_abort(engine: LLMEngine) -> list[str]:
        # One call on the engine thread: no step runs between, so the request is still queued when it is aborted.
        engine.add_request("queued", PROMPT, SamplingParams(max_tokens=4, temperature=0.0), params)
        queued = [r.request_id for r in engine.scheduler.waiting]
        out = engine.abort_request("queued")
        assert out is not None and out.finish_reason == "abort"
        return queued

    assert asyncio.run(decode.call(add_and_abort, timeout=TIMEOUT)) == ["queued"]
    _released(deployment, before)


@pytest.mark.parametrize("ending", ["max_tokens", "stop_token_ids"])
def test_a_decode_request_its_first_token_ends_releases_the_prefill(deployment: TinyPD, ending: str) -> None:
    params, before = _held_leg(deployment)
    first = params["first_token_ids"][0]
    limit: dict[str, Any] = {"max_tokens": 1} if ending == "max_tokens" else \
        {"max_tokens": 4, "stop_token_ids": [first]}
    r = httpx.post(f"{deployment.decode}/v1/completions", timeout=TIMEOUT, json={
        "model": MODEL, "prompt": PROMPT, "temperature": 0.0, "kv_transfer_params": params, **limit})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == ("length" if ending == "max_tokens" else "stop"), choice
    _released(deployment, before)


def test_a_decode_request_the_decode_refuses_releases_the_prefill(deployment: TinyPD) -> None:
    params, before = _held_leg(deployment)
    r = httpx.post(f"{deployment.decode}/v1/completions", timeout=TIMEOUT, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 250, "temperature": 0.0, "kv_transfer_params": params})
    assert r.status_code == 400 and "max_model_len" in r.text, r.text
    _released(deployment, before)


def test_a_refused_decode_leg_of_vllm_push_proxy_params_drops_the_prefill_hold(deployment: TinyPD) -> None:
    """vLLM's push proxy's params name the prefill, not the request nor its blocks: the decode asks the prefill to
    drop the hold of the client request (X-Request-Id) and prompt it would have loaded ("drop_held")."""
    prefill, decode = deployment.loops
    side = prefill.engine.connector
    assert isinstance(side, PrefillSide)
    # What the launcher tells a decode (PDLAUNCH_PREFILL_SIDE_CHANNELS): the prefill's side channel.
    decode.engine._prefill_side_channels = frozenset({side.address()})  # type: ignore[attr-defined]
    host, port = side.address()
    unsigned = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": side.engine_id,
                "remote_host": host, "remote_port": port, "tp_size": 1}
    headers = {"X-Request-Id": f"refused-unsigned-{side.engine_id}"}
    before = held_kv(deployment.prefill)
    leg = httpx.post(f"{deployment.prefill}/v1/completions", headers=headers, timeout=TIMEOUT, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 1, "temperature": 0.0,
        "kv_transfer_params": {"do_remote_decode": True}})
    assert leg.status_code == 200, leg.text
    assert held_kv(deployment.prefill)[0] == before[0] + 1
    r = httpx.post(f"{deployment.decode}/v1/completions", headers=headers, timeout=TIMEOUT, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 250, "temperature": 0.0, "kv_transfer_params": unsigned})
    assert r.status_code == 400 and "max_model_len" in r.text, r.text
    _released(deployment, before)
