"""A PD decode whose load fails after the prefill named (holds) the request's blocks, before any transfer started,
tells the prefill to let them go: the prefill's blocks are back on its free list long before its lease ends.

Real components in this process: a tiny prefill and decode instance (real engines, NIXL over DRAM, their real side
channels). The decode leg gets the prefill's real answer, and its load fails:
- its handshake: the prefill's side channel answers an error, answers a handshake whose KV layout does not fit the
  decode's (another block size), or does not answer within the decode's handshake timeout;
- its planning: the decode's prompt has another length than the prefill's.
The decode then recomputes the prompt (the default load_failure_policy) and answers. The decode used to send the
prefill no word on these paths, which kept the blocks until the lease. A client that leaves while the handshake
waits for an answer frees the loader thread at once (not at the handshake timeout), and the prefill's hold with it.
A 600 s lease, a 300 s transfer timeout: what frees a block within the test's wait was the decode's word.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.handshake import compat_fields, compat_hash
from pdlaunch.kv_transfer.messages import HandshakeAnswer, HandshakeRequest
from pdlaunch.kv_transfer.prefill.side import PrefillSide
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import wait_for
from tests.serving.tiny_instances import TIMEOUT, TinyPD, prefill_leg, tiny_pd

pytestmark = pytest.mark.slow

LEASE_S = 600.0  # the prefill's hold must end by the decode's word, never by its lease
TRANSFER_TIMEOUT_S = 300.0
SHORT_HANDSHAKE_S = 2.0  # "timeout": the handshake gives up after this, the prefill's handler answers never
LONG_HANDSHAKE_S = 300.0  # the others: a handshake that ends within the test's wait ended by its answer or an abort
WAIT_S = 60.0  # generous for a loaded 2-core machine, and far below the lease
PROMPT = list(range(100, 140))  # 40 token ids: 5 blocks of 8


@pytest.fixture
def pd(request: pytest.FixtureRequest) -> Iterator[TinyPD]:
    """Prefill and decode with the test's handshake timeout."""
    handshake_s: float = request.param
    with tiny_pd(f"release-{handshake_s:g}", kv_lease_seconds=LEASE_S, transfer_timeout_seconds=TRANSFER_TIMEOUT_S,
                 handshake_timeout_seconds=handshake_s) as deployment:
        yield deployment


def _on_engine(loop: EngineLoop, fn: Callable[[LLMEngine], Any]) -> Any:
    return asyncio.run(loop.call(fn, timeout=TIMEOUT))


def _state(engine: LLMEngine) -> dict[str, Any]:
    engine.check_integrity()
    return {"used": engine.block_manager.num_used_blocks(), "requests": sorted(engine.scheduler.requests),
            "held": sorted(engine.scheduler.held)}


class _Handshakes:
    """The prefill side channel's handshake handler, replaced: it fails the way the test says."""

    def __init__(self, pd: TinyPD, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
        side = pd.loops[0].engine.connector
        assert isinstance(side, PrefillSide) and side.server is not None and side.spec is not None
        self.spec = side.spec
        self.real: Callable[[HandshakeRequest], HandshakeAnswer] = side.server.handlers["handshake"]  # type: ignore[assignment]
        self.how = how
        self.asked = threading.Event()
        self.release = threading.Event()  # a handler that never answers returns once the test ends
        monkeypatch.setitem(side.server.handlers, "handshake", self.answer)

    def answer(self, message: HandshakeRequest) -> HandshakeAnswer:
        self.asked.set()
        if self.how == "error":
            raise KVTransferError("this prefill engine has not registered its KV cache yet")
        if self.how == "layout":
            info = self.real(message).info  # as a prefill with another cache.block_size answers
            fields = {**compat_fields(self.spec), "block_size": 2 * info.block_size}
            return HandshakeAnswer(info=info.model_copy(update={"block_size": 2 * info.block_size,
                                                                "compat_hash": compat_hash(fields)}))
        assert self.release.wait(TIMEOUT), "the test never let the handshake handler return"
        raise KVTransferError("answered after the test ended")


CASES = [("error", LONG_HANDSHAKE_S), ("layout", LONG_HANDSHAKE_S), ("timeout", SHORT_HANDSHAKE_S),
         ("prompt length", LONG_HANDSHAKE_S)]


@pytest.mark.parametrize("how,pd", CASES, ids=[how.replace(" ", "-") for how, _ in CASES], indirect=["pd"])
def test_a_load_that_fails_before_its_transfer_lets_the_prefill_free_at_once(
        pd: TinyPD, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prefill, decode = pd.loops
    start_prefill, start_decode = _on_engine(prefill, _state), _on_engine(decode, _state)
    recomputed = _on_engine(decode, lambda e: e.scheduler.num_recomputed_loads)
    params = prefill_leg(pd, PROMPT)
    assert _on_engine(prefill, _state)["held"], "the prefill holds the prompt's KV for the decode"
    handshakes = _Handshakes(pd, monkeypatch, how)
    prompt = PROMPT[:-1] if how == "prompt length" else PROMPT  # the decode cannot plan the prefill's blocks
    try:
        answer = httpx.post(f"{pd.decode}/v1/completions", timeout=TIMEOUT, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0.0, "kv_transfer_params": params})
        assert answer.status_code == 200, answer.text
        assert _on_engine(decode, lambda e: e.scheduler.num_recomputed_loads) == recomputed + 1, \
            "the load did not fail (its prompt was not recomputed)"
        assert handshakes.asked.is_set() == (how != "prompt length")
        wait_for(lambda: _on_engine(prefill, _state) == start_prefill,
                 f"the prefill's hold to end (its lease is {LEASE_S:g} s)", WAIT_S)
        wait_for(lambda: _on_engine(decode, _state) == start_decode, "the decode to be as before the request", WAIT_S)
    finally:
        handshakes.release.set()


@pytest.mark.parametrize("pd", [LONG_HANDSHAKE_S], indirect=True)
def test_a_client_that_leaves_during_the_handshake_frees_the_loader_and_the_prefill_at_once(
        pd: TinyPD, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill's side channel never answers the handshake (its timeout is 300 s here). The client leaves: the
    loader thread stops waiting for the answer and tells the prefill, whose hold ends within the test's wait."""
    prefill, decode = pd.loops
    start_prefill, start_decode = _on_engine(prefill, _state), _on_engine(decode, _state)
    params = prefill_leg(pd, PROMPT)
    handshakes = _Handshakes(pd, monkeypatch, "never")

    async def ask_and_leave() -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            asking = asyncio.ensure_future(http.post(f"{pd.decode}/v1/completions", json={
                "model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0.0, "kv_transfer_params": params}))
            await asyncio.to_thread(lambda: handshakes.asked.wait(TIMEOUT) or pytest.fail("no handshake was asked"))
            asking.cancel()  # the client leaves: its connection closes
            await asyncio.gather(asking, return_exceptions=True)

    try:
        asyncio.run(ask_and_leave())
        wait_for(lambda: _on_engine(prefill, _state) == start_prefill,
                 f"the prefill's hold to end while its handshake handler still waits (lease {LEASE_S:g} s)", WAIT_S)
        wait_for(lambda: _on_engine(decode, _state) == start_decode, "the decode to be as before the request", WAIT_S)
        assert not handshakes.release.is_set()
    finally:
        handshakes.release.set()
