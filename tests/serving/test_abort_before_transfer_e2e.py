"""A PD decode request whose client leaves after the decode took blocks for the prompt's KV and before anything was
posted that writes them: the decode's blocks go back to the free list at once (not at the load's deadline), no
load stays behind, nothing is written into them afterwards, and the prefill's hold ends long before its lease.

Real components in this process: a tiny prefill and decode instance (real engines, NIXL over DRAM) behind the real
proxy. The decode's loader thread is stopped at one point of its load (a gate) while the client leaves:
- push: in its handshake (no strategy chosen yet), or just before it sends the push request (the prefill has not
  been told which decode blocks to WRITE);
- pull: in its handshake, or just before it posts the READ;
- pull through the decode's staging slots (what a CuMem KV cache gets on CUDA): the prefill's hold already claimed
  for the load (claim_read answered), its first chunk's READ not posted yet.
The client leaves the decode itself (then only the decode can tell the prefill to let go) or the proxy (which also
releases the prefill's hold). With vLLM's push proxy (both legs at once, params without blocks) the decode asks the
prefill for the block ids, which it may not hold yet: the client leaving then frees the blocks, and the loader
thread, at once. A 600 s lease and a 300 s transfer timeout: what frees a block within the test's wait was the abort.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.kv_transfer.agent import KVAgent
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.peers import PeerCache
from pdlaunch.kv_transfer.decode.side import DecodeSide
from pdlaunch.kv_transfer.prefill.side import PrefillSide
from pdlaunch.kv_transfer.side_channel import client
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import wait_for
from tests.serving.tiny_instances import TIMEOUT, TinyPD, prefill_leg, tiny_pd

pytestmark = pytest.mark.slow

LEASE_S = 600.0  # the prefill's hold must end by the abort's word, never by its lease
TRANSFER_TIMEOUT_S = 300.0  # nor the decode's blocks by the load's deadline
WAIT_S = 60.0  # generous for a loaded 2-core machine, and far below both
STAGING_SLOTS = 2  # decode staging: a 5-block prompt moves in 3 chunks
PROMPT = list(range(100, 140))  # 40 token ids: 5 blocks of 8

# Where the loader thread stops (the method it is about to call) per deployment kind and window.
GATES: dict[str, tuple[type, str]] = {
    "handshake": (PeerCache, "get"),
    "push request": (LoadContext, "request_push"),
    "READ post": (LoadContext, "post_read"),
    "READ after claim": (LoadContext, "read_chunk"),
}


@pytest.fixture
def deployment(request: pytest.FixtureRequest) -> Iterator[TinyPD]:
    """A deployment of the test's kind: push, pull, or pull through the decode's staging slots."""
    kind: str = request.param
    mode = "pull" if kind.startswith("pull") else "push"
    with ExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:
            if kind == "pull-staged":  # only the decode: its KV moves through staging slots, as a CuMem cache's
                patch.setattr(DecodeSide, "_staging_budget", lambda self, spec: STAGING_SLOTS * sum(spec.block_bytes))
            pd = stack.enter_context(tiny_pd(f"abort-{kind}", transfer_mode=mode, kv_lease_seconds=LEASE_S,
                                             transfer_timeout_seconds=TRANSFER_TIMEOUT_S))
        yield pd


@dataclass
class Gate:
    """Stops the first call of a method on a loader thread until `go` (none: `entered` once the decode sends an
    `enter_on` message); records what the decode sends meanwhile."""

    enter_on: str = ""
    entered: threading.Event = field(default_factory=threading.Event)
    go: threading.Event = field(default_factory=threading.Event)
    returned: threading.Event = field(default_factory=threading.Event)
    sent: list[str] = field(default_factory=list)  # side-channel messages (by type) and transfers (by op)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, patch: pytest.MonkeyPatch, owner: type | None = None, name: str = "") -> None:
        # Every side-channel request goes out through client.send (client.request too).
        patch.setattr(client, "send", self._recording(client.send, lambda a, kw: (a[2:3] or [kw["message"]])[0].type))
        patch.setattr(KVAgent, "transfer", self._recording(KVAgent.transfer, lambda a, kw: a[1]))
        if owner is None:
            return
        original = getattr(owner, name)

        def gated(this: Any, *args: Any, **kwargs: Any) -> Any:
            with self.lock:
                first = not self.entered.is_set()
                self.entered.set()
            if not first:
                return original(this, *args, **kwargs)
            try:
                assert self.go.wait(TIMEOUT), "the test never opened the gate"
                return original(this, *args, **kwargs)
            finally:
                self.returned.set()

        patch.setattr(owner, name, gated)

    def _recording(self, fn: Callable[..., Any], what: Callable[[tuple[Any, ...], dict[str, Any]], str]
                   ) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.sent.append(what(args, kwargs))
                if self.sent[-1] == self.enter_on:
                    self.entered.set()
            return fn(*args, **kwargs)

        return recorded

    def since(self, mark: int) -> list[str]:
        with self.lock:
            return self.sent[mark:]


def _on_engine(loop: EngineLoop, fn: Callable[[LLMEngine], Any]) -> Any:
    return asyncio.run(loop.call(fn, timeout=TIMEOUT))


def _decode_state(engine: LLMEngine) -> dict[str, Any]:
    engine.check_integrity()
    s, connector = engine.scheduler, engine.connector
    assert isinstance(connector, DecodeSide)
    staging = connector.ctx.staging
    return {"used": engine.block_manager.num_used_blocks(), "requests": sorted(s.requests),
            "waiting_for_kv": sorted(s.waiting_for_kv), "draining": sorted(s.draining),
            "loads": sorted(connector.loads.table.request_ids()),
            "free_slots": staging.num_free() if staging is not None else None}


def _prefill_state(engine: LLMEngine) -> dict[str, Any]:
    engine.check_integrity()
    connector = engine.connector
    assert connector is not None
    return {"used": engine.block_manager.num_used_blocks(), "held": sorted(engine.scheduler.held),
            "holds": connector.info()["held_requests"]}


async def _ask_and_leave(url: str, body: dict[str, Any], gate: Gate, decode: EngineLoop,
                         headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Send `body`, wait for the decode's loader to reach the gate, and leave; the decode's state just before."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        asking = asyncio.ensure_future(http.post(url, json=body, headers=headers))
        await asyncio.to_thread(lambda: gate.entered.wait(TIMEOUT) or pytest.fail("the load never reached the gate"))
        before = await decode.call(_decode_state, timeout=TIMEOUT)
        asking.cancel()  # the client leaves: its connection closes
        await asyncio.gather(asking, return_exceptions=True)
    return before


CASES = [("push", "handshake"), ("push", "push request"), ("pull", "handshake"), ("pull", "READ post"),
         ("pull-staged", "READ after claim")]


@pytest.mark.parametrize("via", ["decode", "proxy"])
@pytest.mark.parametrize("deployment,window", CASES, ids=[f"{k}-{w.replace(' ', '-')}" for k, w in CASES],
                         indirect=["deployment"])
def test_a_client_that_leaves_before_the_transfer_gets_every_block_back_at_once(
        deployment: TinyPD, window: str, via: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pd = deployment
    prefill, decode = pd.loops
    start_decode, start_prefill = _on_engine(decode, _decode_state), _on_engine(prefill, _prefill_state)
    body: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0.0}
    if via == "decode":
        body["kv_transfer_params"] = prefill_leg(pd, PROMPT)
        assert _on_engine(prefill, _prefill_state)["held"], "the prefill holds the prompt's KV for the decode"
    gate = Gate()
    gate.install(monkeypatch, *GATES[window])
    try:
        before = asyncio.run(_ask_and_leave(f"{pd.decode if via == 'decode' else pd.proxy}/v1/completions", body,
                                            gate, decode))
        assert before["waiting_for_kv"] and before["loads"] and before["used"] > start_decode["used"], before
        mark = len(gate.sent)
        # The loader thread still waits at the gate: the abort alone gives the decode's blocks back.
        wait_for(lambda: _on_engine(decode, _decode_state)["used"] == start_decode["used"],
                 "the decode's blocks back on the free list while its loader waits", WAIT_S)
        state = _on_engine(decode, _decode_state)
        assert state["requests"] == state["waiting_for_kv"] == state["draining"] == [], state
        assert state["loads"] == [], "the aborted load is still in the decode's table"
    finally:
        gate.go.set()
    assert gate.returned.wait(TIMEOUT), "the gated call never returned"
    wait_for(lambda: _on_engine(decode, _decode_state) == start_decode, "the decode to be as before the request",
             WAIT_S)
    wait_for(lambda: _on_engine(prefill, _prefill_state) == start_prefill,
             "the prefill's hold to end (its lease is 600 s)", WAIT_S)
    late = gate.since(mark)
    # Nothing that writes the decode's blocks (nor claims the prefill's) goes out after the abort.
    assert not {"push", "claim_read", "stage", "READ", "WRITE"} & set(late), late


def _unsigned_push_params(pd: TinyPD) -> dict[str, Any]:
    """The decode leg's params from vLLM's push proxy: the prefill's address and engine, no blocks, no request id."""
    prefill, decode = pd.loops
    side = prefill.engine.connector
    assert isinstance(side, PrefillSide)
    # What the launcher tells a decode (PDLAUNCH_PREFILL_SIDE_CHANNELS): the prefill's side channel.
    decode.engine._prefill_side_channels = frozenset({side.address()})  # type: ignore[attr-defined]
    host, port = side.address()
    return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": side.engine_id,
            "remote_host": host, "remote_port": port, "tp_size": 1}


@pytest.mark.parametrize("deployment", ["push"], indirect=True)
def test_a_decode_leg_that_leaves_before_its_prefill_named_the_request_gets_every_block_back_at_once(
        deployment: TinyPD, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's push proxy sends both legs at once: the decode's params name the prefill but no blocks, and the
    decode asks the prefill for them ("held_blocks", by the X-Request-Id both legs share), waiting until the prefill
    holds the request. The client leaves before that: the decode's blocks come back at once, and the decode tells the
    prefill what it asked for ("drop_held"; or, should its last ask see the hold come, cancels the request it learnt
    of); the prefill, which holds the request only afterwards, lets it go as it holds it, not at its lease's end."""
    prefill, decode = deployment.loops
    unsigned = _unsigned_push_params(deployment)
    start_decode, start_prefill = _on_engine(decode, _decode_state), _on_engine(prefill, _prefill_state)
    headers = {"X-Request-Id": "leaves-before-the-prefill"}
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0.0, "kv_transfer_params": unsigned}
    gate = Gate(enter_on="held_blocks")  # the decode's loader waits for the prefill's answer from then on
    gate.install(monkeypatch)
    before = asyncio.run(_ask_and_leave(f"{deployment.decode}/v1/completions", body, gate, decode, headers))
    assert before["waiting_for_kv"] and before["used"] > start_decode["used"], before
    wait_for(lambda: _on_engine(decode, _decode_state)["used"] == start_decode["used"],
             "the decode's blocks back on the free list while its loader waits for the block ids", WAIT_S)
    assert _on_engine(decode, _decode_state)["loads"] == [], "the aborted load is still in the decode's table"
    mark = len(gate.since(0))
    # The prefill leg ends now: the prefill holds the request, and answers the decode that left.
    leg = httpx.post(f"{deployment.prefill}/v1/completions", headers=headers, timeout=TIMEOUT, json={
        "model": "tiny", "prompt": PROMPT, "max_tokens": 1, "temperature": 0.0,
        "kv_transfer_params": {"do_remote_decode": True}})
    assert leg.status_code == 200, leg.text
    wait_for(lambda: _on_engine(prefill, _prefill_state) == start_prefill,
             "the prefill's hold to end (its lease is 600 s)", WAIT_S)
    wait_for(lambda: _on_engine(decode, _decode_state) == start_decode, "the decode to be as before the request",
             WAIT_S)
    # Told what it asked for, or (an ask that saw the hold come just as the client left) the request it learnt of.
    assert {"drop_held", "cancel_push"} & set(gate.since(0)), gate.since(0)
    late = gate.since(mark)
    assert not {"push", "READ", "WRITE"} & set(late), late


@pytest.mark.parametrize("deployment", ["push"], indirect=True)
def test_decode_legs_that_leave_while_waiting_for_their_block_ids_hold_no_loader_thread(
        deployment: TinyPD, monkeypatch: pytest.MonkeyPatch) -> None:
    """As many decode legs as the decode has loader threads ask the prefill for block ids of requests it will never
    hold (vLLM's push proxy cancelled the prefill legs too), and their clients leave: the loader threads come free
    at once, so the next PD request's load runs now, not once those asks ran out (the 300 s transfer timeout). A
    loader thread stays in the prefill's wait; a request waiting for one never sees its KV, and an aborted push's
    cancel (also sent from a loader thread) never goes out: its blocks drain until the load's deadline."""
    prefill, decode = deployment.loops
    unsigned = _unsigned_push_params(deployment)
    connector = decode.engine.connector
    assert isinstance(connector, DecodeSide)
    workers = connector.ctx.executor._max_workers  # noqa: SLF001
    start_decode = _on_engine(decode, _decode_state)
    gate = Gate()
    gate.install(monkeypatch)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0.0, "kv_transfer_params": unsigned}

    async def ask_and_leave() -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            asking = [asyncio.ensure_future(http.post(f"{deployment.decode}/v1/completions", json=body,
                                                      headers={"X-Request-Id": f"never-prefilled-{i}"}))
                      for i in range(workers)]
            await asyncio.to_thread(wait_for, lambda: gate.since(0).count("held_blocks") == workers,
                                    "every loader thread to wait for block ids", WAIT_S)
            for ask in asking:
                ask.cancel()
            await asyncio.gather(*asking, return_exceptions=True)

    asyncio.run(ask_and_leave())
    wait_for(lambda: _on_engine(decode, _decode_state) == start_decode, "the decode to be as before the requests",
             WAIT_S)
    params = prefill_leg(deployment, PROMPT)
    recomputed = _on_engine(decode, lambda e: e.scheduler.num_recomputed_loads)
    try:
        answer = httpx.post(f"{deployment.decode}/v1/completions", timeout=WAIT_S, json={
            "model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0.0, "kv_transfer_params": params})
    except httpx.TimeoutException:
        pytest.fail(f"a PD request's load waited over {WAIT_S:g}s for a loader thread")
    assert answer.status_code == 200, answer.text
    assert _on_engine(decode, lambda e: e.scheduler.num_recomputed_loads) == recomputed, "its KV was not loaded"
    wait_for(lambda: _on_engine(decode, _decode_state) == start_decode, "the decode to free the request's blocks",
             WAIT_S)
