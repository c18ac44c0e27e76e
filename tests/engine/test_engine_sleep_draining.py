"""Sleep mode on a decode whose aborted KV load still drains: the blocks a transfer may still write keep the
instance awake (the KV memory must outlive that write); /sleep waits for the drain like it waits for a hold,
and refuses, naming the drain, when it outlasts the window."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.engine import sleep_mode
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import EngineError
from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector, KVConnectorEvents
from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer, wants_remote_prefill
from pdlaunch.kvcache.block_integrity import BlockIntegrityError
from tests.engine.conftest import MakeEngine
from tests.engine.test_engine_connector import spec

PROMPT = list(range(5, 25))  # 20 tokens: 3 blocks of 8
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


class DrainingConnector(KVConnector):
    """A decode's connector whose aborted load may still write its blocks (a READ it cannot cancel) until
    `polls_left` more get_finished calls have passed (None: until the test says so)."""

    def __init__(self) -> None:
        self.draining: set[str] = set()
        self.polls_left: int | None = None

    def register_kv_caches(self, spec: KVCacheSpec) -> None:
        pass

    def get_num_new_matched_tokens(self, request_id: str, prompt_token_ids: list[int],
                                   kv_transfer_params: KVTransferParams | None, num_local_computed_tokens: int) -> int:
        if wants_remote_prefill(kv_transfer_params):
            return len(prompt_token_ids) - 1 - num_local_computed_tokens
        return 0

    def get_finished(self) -> KVConnectorEvents:
        events = KVConnectorEvents()
        if self.polls_left is not None:
            self.polls_left -= 1
            if self.polls_left <= 0:
                events.safe_to_free, self.draining = self.draining, set()
        return events

    def abort_load(self, request_id: str) -> bool:
        self.draining.add(request_id)
        return True


def _aborted_mid_load(make_engine: MakeEngine, path: Path) -> tuple[LLMEngine, DrainingConnector]:
    conn = DrainingConnector()
    engine = make_engine(path, instance=spec("decode", "D"), connector=conn, enable_sleep_mode=True)
    engine.add_request("d", PROMPT, GREEDY, PrefillAnswer(do_remote_prefill=True, remote_engine_id="P",
                                                          remote_request_id="p-d"))
    engine.step()
    assert "d" in engine.scheduler.waiting_for_kv
    assert engine.abort_request("d") is not None
    assert "d" in engine.scheduler.draining and engine.block_manager.num_used_blocks() == 3
    return engine, conn


def test_sleep_waits_for_an_aborted_load_to_drain(llama_ckpt: Path, make_engine: MakeEngine) -> None:
    engine, conn = _aborted_mid_load(make_engine, llama_ckpt)
    conn.polls_left = 2  # the transfer ends while /sleep steps the engine
    result = engine.sleep(1)
    assert engine.is_sleeping() and result.freed_bytes > 0
    assert not engine.scheduler.draining and engine.block_manager.num_used_blocks() == 0
    engine.wake_up()


def test_sleep_refuses_while_an_aborted_load_still_drains(llama_ckpt: Path, make_engine: MakeEngine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sleep_mode, "HOLD_DRAIN_S", 0.2)  # the transfer outlasts the window
    engine, conn = _aborted_mid_load(make_engine, llama_ckpt)
    with pytest.raises(EngineError) as info:
        engine.sleep(1)
    assert not isinstance(info.value, BlockIntegrityError)  # not a bookkeeping bug: the instance is busy
    assert info.value.message == ("0 request(s) running, 0 KV hold(s) waiting for a decode instance and 1 ended "
                                  "KV load(s) whose transfer may still write their blocks (after 0.2s)")
    assert info.value.field == "sleep" and not engine.is_sleeping()
    assert "d" in engine.scheduler.draining  # its blocks stay out of the free list
    conn.polls_left = 1
    engine.step()
    assert engine.block_manager.num_used_blocks() == 0
    engine.sleep(1)
    assert engine.is_sleeping()
    engine.wake_up()
