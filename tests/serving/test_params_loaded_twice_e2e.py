"""The same signed kv_transfer_params loaded twice on one decode (a client sending its params again, or a decode leg
retried on the same decode), and the first request's client leaves while the second load READs: the second answer is
what a colocated run answers, and the prefill's blocks stay held until the second load's read_done.

The prefill counts READ claims and read_done/release notifications per decode load (prefill/hold.py). It counted
them per decode engine: the first load's release (its client left) ended the hold under the second load's claimed
READ, its blocks went back to the free list, other prompts took them, and the second load READ their KV (verify_kv
is off by default).

Real components in this process: a tiny prefill and decode (real engines, NIXL over DRAM); the decode's KV moves
through staging slots (as a CuMem cache's), so each load claims the prefill's hold (claim_read) before its first
chunk's READ. Both loads stop once their claim was answered (a gate) until the first client left, the prefill took
its release, and other prompts ran on the prefill. A 600 s lease and a 300 s transfer timeout: nothing here ends by
them.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load
from pdlaunch.kv_transfer.decode.side import DecodeSide
from pdlaunch.kv_transfer.prefill.side import PrefillSide
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import wait_for
from tests.serving.tiny_instances import MODEL, TIMEOUT, TinyPD, prefill_leg, tiny_pd

pytestmark = pytest.mark.slow

LEASE_S = 600.0
TRANSFER_TIMEOUT_S = 300.0
WAIT_S = 60.0  # generous for a loaded 2-core machine, and far below both
STAGING_SLOTS = 2  # the decode's staging: a 5-block prompt moves in 3 chunks
PROMPT = list(range(100, 140))  # 40 token ids: 5 blocks of 8
ANSWER_TOKENS = 8
# Prompts the prefill runs while both loads wait: 3 x 25 blocks, more than its 64, so blocks freed under the
# second load would hold their KV by the time it READs.
OTHER_PROMPTS = [random.Random(seed).choices(range(150, 500), k=200) for seed in range(3)]


@pytest.fixture
def pd() -> Iterator[TinyPD]:
    with ExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:  # only the decode has staging slots
            patch.setattr(DecodeSide, "_staging_budget", lambda self, spec: STAGING_SLOTS * sum(spec.block_bytes))
            deployment = stack.enter_context(tiny_pd("loaded-twice", transfer_mode="pull", kv_lease_seconds=LEASE_S,
                                                     transfer_timeout_seconds=TRANSFER_TIMEOUT_S))
        yield deployment


class ReadGate:
    """Stops every load once the prefill answered its claim (before it takes staging slots: the first load would
    keep them all) until `go`; `loads`: the decode request ids that reached it."""

    def __init__(self, patch: pytest.MonkeyPatch) -> None:
        self.go = threading.Event()
        self.loads: list[str] = []
        self._lock = threading.Lock()
        original = LoadContext.claim_read

        def gated(this: LoadContext, load: Load, remote: RemoteKV) -> None:
            original(this, load, remote)
            with self._lock:
                self.loads.append(load.request_id)
            assert self.go.wait(TIMEOUT), "the test never opened the gate"

        patch.setattr(LoadContext, "claim_read", gated)

    def reached(self, count: int) -> bool:
        with self._lock:
            return len(self.loads) >= count


def _on_engine(loop: EngineLoop, fn: Callable[[LLMEngine], Any]) -> Any:
    return asyncio.run(loop.call(fn, timeout=TIMEOUT))


def _held(engine: LLMEngine) -> list[str]:
    return sorted(engine.scheduler.held)


def _decode_requests(engine: LLMEngine) -> list[str]:
    return sorted(engine.scheduler.requests)


def _ask(url: str, prompt: list[int], max_tokens: int, params: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "ignore_eos": True}
    if params is not None:
        body["kv_transfer_params"] = params
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["text"]
    return text


async def _two_loads_first_leaves(pd: TinyPD, params: dict[str, Any], gate: ReadGate,
                                  while_second_waits: Callable[[], None]) -> str:
    """Load `params` for two requests on the decode; once both wait at the gate, the first client leaves and
    `while_second_waits` runs; then the gate opens. The second request's text."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": ANSWER_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "kv_transfer_params": params}
    url = f"{pd.decode}/v1/completions"
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        first = asyncio.ensure_future(http.post(url, json=body))
        await asyncio.to_thread(wait_for, lambda: gate.reached(1), "the first load's claimed READ", WAIT_S)
        second = asyncio.ensure_future(http.post(url, json=body))
        await asyncio.to_thread(wait_for, lambda: gate.reached(2), "the second load's claimed READ", WAIT_S)
        first.cancel()  # its client leaves: its connection closes, the decode aborts its load
        await asyncio.gather(first, return_exceptions=True)
        try:
            await asyncio.to_thread(while_second_waits)
        finally:
            gate.go.set()
        response = await second
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["text"]
    return text


def test_the_second_load_of_the_same_params_reads_the_prompts_kv_after_the_first_client_left(
        pd: TinyPD, monkeypatch: pytest.MonkeyPatch) -> None:
    prefill, decode = pd.loops
    side = prefill.engine.connector
    assert isinstance(side, PrefillSide)
    params = prefill_leg(pd, PROMPT)
    held = params["remote_request_id"]
    assert _on_engine(prefill, _held) == [held]
    gate = ReadGate(monkeypatch)

    def release_taken() -> bool:
        """The first load's release reached the prefill (a NIXL notification): the hold counted it, or ended."""
        hold = side.holds.get(held)
        return hold is None or hold.done or bool(hold.notified)

    def first_release_counted_then_other_prompts() -> None:
        wait_for(lambda: len(_on_engine(decode, _decode_requests)) == 1, "the decode to drop the first request", WAIT_S)
        wait_for(release_taken, "the prefill to take the first load's release", WAIT_S)
        hold = side.holds.get(held)
        assert hold is not None and not hold.done, "the first load's release ended the hold the second one READs"
        for prompt in OTHER_PROMPTS:
            _ask(pd.prefill, prompt, 1)
        assert _on_engine(prefill, _held) == [held]

    text = asyncio.run(_two_loads_first_leaves(pd, params, gate, first_release_counted_then_other_prompts))
    assert text == _ask(pd.prefill, PROMPT, ANSWER_TOKENS), "the second load's answer is not the colocated one"
    wait_for(lambda: _on_engine(prefill, _held) == [], "the prefill's hold to end at the second load's read_done "
             f"(its lease is {LEASE_S:g} s)", WAIT_S)
    wait_for(lambda: _on_engine(decode, _decode_requests) == [], "the decode to end both requests", WAIT_S)
