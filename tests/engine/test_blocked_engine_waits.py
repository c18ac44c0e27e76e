"""An engine whose waiting requests cannot get KV blocks while nothing runs (`LLMEngine.is_blocked`): a PD prefill
whose free blocks are all held for decode legs, a decode whose blocks drain after an aborted load. Each step finds the
same until a block is released, so the engine loop waits for a command up to `blocked_wait_s` between its steps
instead of stepping at once, which spun a core and took the GIL from the threads that receive the releases (17,600
steps a second on a 2-core CPU machine)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector, KVConnectorEvents
from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer, wants_remote_decode
from pdlaunch.server.engine_loop import BLOCKED_WAIT_S, EngineLoop
from tests.engine.conftest import MakeEngine
from tests.engine.test_engine_connector import spec
from tests.engine.test_engine_sleep_draining import PROMPT, DrainingConnector
from tests.serving.helpers import wait_for

PREFILL = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
TIMEOUT = 60.0


class HoldingConnector(KVConnector):
    """A prefill's connector that holds the blocks of every request asked for a remote decode until `release` (a
    decode's read_done, received on another thread) or `release_held` (the HTTP release route's call) names it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: set[str] = set()
        self.released: set[str] = set()

    def register_kv_caches(self, spec: KVCacheSpec) -> None:
        pass

    def request_finished(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None,
                         block_ids: list[list[int]]) -> tuple[bool, PrefillAnswer | None]:
        if not wants_remote_decode(kv_transfer_params):
            return False, None
        with self.lock:
            self.held.add(request_id)
        return True, PrefillAnswer(do_remote_prefill=True, remote_engine_id="P", remote_block_ids=block_ids,
                                   remote_request_id=request_id)

    def release(self, request_id: str) -> bool:
        with self.lock:
            if request_id not in self.held:
                return False
            self.held.discard(request_id)
            self.released.add(request_id)
            return True

    def release_held(self, request_id: str) -> bool:
        return self.release(request_id)

    def get_finished(self) -> KVConnectorEvents:
        with self.lock:
            released, self.released = self.released, set()
        return KVConnectorEvents(finished_sending=released)


class CountedSteps:
    """engine.step, counted (the engine thread calls it; the test reads the count)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.count = 0
        self._step = engine.step
        engine.step = self  # type: ignore[method-assign]

    def __call__(self) -> list[RequestOutput]:
        self.count += 1
        return self._step()


def _full_prefill(make_engine: MakeEngine, path: Path) -> tuple[LLMEngine, HoldingConnector]:
    """A prefill of 4 blocks, all held for the decode legs of h0 and h1 (15 prompt tokens: 2 blocks each)."""
    conn = HoldingConnector()
    engine = make_engine(path, instance=spec("prefill", "P"), connector=conn, num_gpu_blocks=4)
    for rid in ("h0", "h1"):
        engine.add_request(rid, list(range(1, 16)), PREFILL, kv_transfer_params={"do_remote_decode": True})
    while engine.has_unfinished_requests():
        engine.step()
        assert not engine.is_blocked()  # its requests ran
    assert set(engine.scheduler.held) == {"h0", "h1"} and engine.block_manager.num_free_blocks() == 0
    return engine, conn


def _blocked_loop(engine: LLMEngine, **waits: float) -> EngineLoop:
    """The engine in an engine loop, with request w submitted and waiting for blocks that only a release frees."""
    loop = EngineLoop(lambda: engine, **waits)
    loop.start()
    assert loop.wait_ready(TIMEOUT), "the engine loop to start"

    async def submit() -> None:  # its event loop closes: nobody reads the stream, the engine runs it all the same
        loop.submit("w", list(range(20, 35)), PREFILL, {"do_remote_decode": True})

    async def waiting() -> list[str]:  # read on the engine thread (a command: the loop steps once after it)
        return await loop.call(lambda e: [r.request_id for r in e.scheduler.waiting], timeout=TIMEOUT)

    asyncio.run(submit())
    wait_for(engine.is_blocked, "request w to wait for blocks held for h0 and h1", TIMEOUT)
    assert asyncio.run(waiting()) == ["w"]
    return loop


def test_a_blocked_prefill_steps_only_when_a_command_comes(llama_ckpt: Path, make_engine: MakeEngine) -> None:
    engine, _ = _full_prefill(make_engine, llama_ckpt)
    steps = CountedSteps(engine)
    # A blocked wait far above any test timeout: only a command can make the loop step.
    loop = _blocked_loop(engine, blocked_wait_s=600.0)
    try:
        # A window with no command (what is measured is that nothing happens, so it is a window, not a wait for a
        # condition): a loop that stepped a blocked engine at once would step thousands of times in it.
        before = steps.count
        threading.Event().wait(1.0)
        assert steps.count - before <= 1, f"{steps.count - before} steps in 1 s of a blocked engine"
        # The HTTP release route's call ends the wait at once; the step after it frees the blocks and prefills w.
        assert asyncio.run(loop.release_held_kv("h0", timeout=TIMEOUT))
        wait_for(lambda: "w" in engine.scheduler.held, "request w to be prefilled in the blocks h0 held", TIMEOUT)
        assert not engine.is_blocked()
    finally:
        loop.stop()


def test_a_release_the_connector_receives_is_found_at_the_next_poll(llama_ckpt: Path,
                                                                    make_engine: MakeEngine) -> None:
    engine, conn = _full_prefill(make_engine, llama_ckpt)
    steps = CountedSteps(engine)
    loop = _blocked_loop(engine)  # the waits an instance runs with
    try:
        before = steps.count
        threading.Event().wait(1.0)  # a window, as above
        polls = steps.count - before
        assert polls < 1000, f"{polls} steps in 1 s of a blocked engine (its {BLOCKED_WAIT_S}s wait allows 500)"
        assert polls >= 1, "the blocked engine was never polled: a release its connector receives would be missed"
        assert conn.release("h1")  # the decode of h1 read its blocks: a notification, no command
        wait_for(lambda: "w" in engine.scheduler.held, "request w to be prefilled in the blocks h1 held", TIMEOUT)
    finally:
        loop.stop()


def test_a_decode_whose_blocks_drain_is_blocked_until_they_are_safe_to_free(llama_ckpt: Path,
                                                                            make_engine: MakeEngine) -> None:
    conn = DrainingConnector()  # an aborted load's READ may still write its blocks until the test says
    engine = make_engine(llama_ckpt, instance=spec("decode", "D"), connector=conn, num_gpu_blocks=4)
    answer = PrefillAnswer(do_remote_prefill=True, remote_engine_id="P", remote_request_id="p-d")
    engine.add_request("d", PROMPT, PREFILL, answer)
    engine.step()
    assert "d" in engine.scheduler.waiting_for_kv and not engine.is_blocked()  # a load: step() paces its polls
    assert engine.abort_request("d") is not None
    assert "d" in engine.scheduler.draining and engine.block_manager.num_free_blocks() == 1
    engine.add_request("e", PROMPT, PREFILL, answer.model_copy(update={"remote_request_id": "p-e"}))
    engine.step()
    assert engine.is_blocked() and [r.request_id for r in engine.scheduler.waiting] == ["e"]  # 3 blocks, 1 free
    engine.step()
    assert engine.is_blocked()  # the next step finds the same
    conn.polls_left = 1  # the READ ended: the next poll names d safe to free
    engine.step()
    assert "e" in engine.scheduler.waiting_for_kv and not engine.is_blocked()
    assert engine.abort_request("e") is not None
    conn.polls_left = 1
    engine.step()
    assert not engine.has_unfinished_requests() and not engine.is_blocked()
