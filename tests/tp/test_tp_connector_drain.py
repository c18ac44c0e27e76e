"""TPConnector keeps a failed or aborted load's blocks until every rank that may still be written
says they are safe (base.py "Lifecycle contract"), whatever order the ranks report in."""

from __future__ import annotations

from typing import Any

from pdlaunch.distributed.messages import ConnectorCall
from pdlaunch.distributed.tp_connector import TPConnector, rank_connector_call
from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector, KVConnectorEvents
from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer


class ScriptedRank(KVConnector):
    """One rank's connector whose reports the test writes: events queued per get_finished call."""

    def __init__(self, busy_on_abort: bool = False) -> None:
        self.queue: list[KVConnectorEvents] = []
        self.busy_on_abort = busy_on_abort
        self.aborted: list[str] = []

    def register_kv_caches(self, spec: KVCacheSpec) -> None:
        pass

    def get_num_new_matched_tokens(self, request_id: str, prompt_token_ids: list[int],
                                   kv_transfer_params: KVTransferParams | None, num_local_computed_tokens: int) -> int:
        return 0

    def start_load(self, *args: Any) -> None:
        pass

    def request_finished(self, *args: Any) -> tuple[bool, PrefillAnswer | None]:
        return False, None

    def get_finished(self) -> KVConnectorEvents:
        return self.queue.pop(0) if self.queue else KVConnectorEvents()

    def abort_load(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return self.busy_on_abort


def pair(rank0: ScriptedRank, rank1: ScriptedRank) -> TPConnector:
    def mirror(call: ConnectorCall) -> list[Any]:
        reply = rank_connector_call(rank1, 1, 2, call)  # what rank 1's worker runs on the message
        return [reply] if call.reply_type is not None else []
    return TPConnector(rank0, 2, mirror, [None, None])


def test_failure_with_a_busy_rank_drains_until_that_rank_is_safe() -> None:
    rank0, rank1 = ScriptedRank(), ScriptedRank()
    tp = pair(rank0, rank1)
    rank1.queue = [KVConnectorEvents(failed_recving={"r": "peer gone"}, draining={"r"}),
                   KVConnectorEvents(), KVConnectorEvents(safe_to_free={"r"})]
    first = tp.get_finished()
    assert "r" in first.failed_recving and first.draining == {"r"}
    assert rank0.aborted == ["r"]  # the rank still loading was told to stop
    assert tp.get_finished().safe_to_free == set()
    assert tp.get_finished().safe_to_free == {"r"}


def test_abort_returns_busy_when_any_rank_is_and_frees_after_all_of_them() -> None:
    rank0, rank1 = ScriptedRank(busy_on_abort=True), ScriptedRank(busy_on_abort=True)
    tp = pair(rank0, rank1)
    assert tp.abort_load("a") is True
    rank0.queue = [KVConnectorEvents(safe_to_free={"a"})]
    assert tp.get_finished().safe_to_free == set()  # rank 1 may still be written
    rank1.queue = [KVConnectorEvents(safe_to_free={"a"})]
    assert tp.get_finished().safe_to_free == {"a"}
    rank0.busy_on_abort = rank1.busy_on_abort = False
    assert tp.abort_load("b") is False


def test_draining_and_safe_in_one_round_frees_with_the_failure() -> None:
    rank0, rank1 = ScriptedRank(), ScriptedRank()
    tp = pair(rank0, rank1)
    rank1.queue = [KVConnectorEvents(failed_recving={"r": "timeout"}, draining={"r"}, safe_to_free={"r"})]
    events = tp.get_finished()
    assert "r" in events.failed_recving and events.draining == set() and events.safe_to_free == set()
    assert tp.get_finished() == KVConnectorEvents()
