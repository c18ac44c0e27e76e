"""A load from the CPU offload tier that cannot be queued after the request's device blocks were
allocated: the request ends with an error naming the CPU tier and its blocks go back to the free list
(they leaked, and the error ended the whole step); the other requests of the step go on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pdlaunch.engine.request import RequestStatus
from pdlaunch.engine.scheduler import Scheduler
from pdlaunch.errors import EngineError
from pdlaunch.offload.manager import OffloadManager
from pdlaunch.offload.transfer_spec import TransferSpec
from tests.engine.test_scheduler import BS, FakeConnector, drain, req, step
from tests.helpers.offload_tier import BASE, manager_holding_two_blocks


@pytest.fixture
def offload() -> Iterator[OffloadManager]:
    yield from manager_holding_two_blocks()


def _rejected(job_id: int, spec: TransferSpec) -> bool:
    raise EngineError("group 0: a block id is out of range", field="offload.spec")


@pytest.mark.parametrize("connector", [None, FakeConnector()], ids=["local", "connector"])
def test_a_cpu_load_that_cannot_be_queued_fails_its_request_and_frees_its_blocks(
        offload: OffloadManager, connector: FakeConnector | None, monkeypatch: pytest.MonkeyPatch) -> None:
    bm = offload.block_manager
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, connector=connector, offload=offload)
    hit = req("hit", 3 * BS, base=BASE)
    other = req("other", 2 * BS)
    s.add_request(hit)
    s.add_request(other)
    monkeypatch.setattr(offload.transfer, "transfer_async", _rejected)
    out = step(s)  # checks the block manager's integrity
    assert [x.request.request_id for x in out.scheduled] == ["other"]
    assert s.take_failed() == [hit]
    assert hit.status == RequestStatus.FINISHED and hit.finish_reason == "error" and hit.error_status == 500
    assert "CPU offload tier" in (hit.error or "") and "out of range" in (hit.error or "")
    assert not bm.has_blocks("hit") and bm.num_used_blocks() == len(bm.block_ids("other")[0])
    offload.check_integrity()
    if connector is not None:
        assert connector.aborted == ["hit"] and connector.loads == []
    monkeypatch.undo()
    drain(s)
    assert bm.num_used_blocks() == 0 and offload.hit_blocks == 0
    bm.check_integrity()
