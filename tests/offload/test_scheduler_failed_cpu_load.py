"""A load from the CPU offload tier that was queued and then failed while copying, before the step's compute:
the scheduler ends only its request (out of the step, a 500 naming the CPU tier, blocks back on the free list;
a PD decode's connector load aborted first) and the other requests of the step go on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pdlaunch.engine.request import RequestStatus
from pdlaunch.engine.scheduler import Scheduler
from pdlaunch.metrics.vllm_series import PREFIX_CACHE_HITS, vllm
from pdlaunch.offload.manager import OffloadManager
from tests.engine.test_scheduler import BS, FakeConnector, drain, req
from tests.helpers.offload_tier import BASE, loads_fail_while_copying, manager_holding_two_blocks


@pytest.fixture
def offload() -> Iterator[OffloadManager]:
    yield from manager_holding_two_blocks()


@pytest.mark.parametrize("pd", [False, True], ids=["local", "pd-decode"])
def test_a_cpu_load_that_fails_after_it_was_queued_fails_only_its_request(
        offload: OffloadManager, pd: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    bm = offload.block_manager
    connector = FakeConnector() if pd else None
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, connector=connector, offload=offload)
    hit = req("hit", 3 * BS, base=BASE, params={"do_remote_prefill": True} if pd else None)
    other = req("other", 2 * BS)
    s.add_request(hit)
    s.add_request(other)
    loads_fail_while_copying(offload, monkeypatch)
    hits = vllm(PREFIX_CACHE_HITS)._value.get()
    out = s.schedule()
    # the load was queued (a PD decode's connector loads the rest of its prompt but the last token)
    assert (hit.num_cached_tokens, hit.num_external_tokens) == (2 * BS, BS - 1 if pd else 0)
    assert [x.request.request_id for x in out.scheduled] == (["other"] if pd else ["hit", "other"])
    offload.before_compute()  # the step's compute waits for the load: its failure is known by now
    assert s.fail_cpu_loads(out, offload.take_failed_loads()) == [hit]
    # The failed load's tokens count as no hit anywhere: the request reports none (nor any loaded by a PD
    # decode's connector, aborted with it), vLLM's hits, the stats and the tier's hit blocks stay where they were.
    assert (hit.num_cached_tokens, hit.num_external_tokens, s.prompt_tokens_cached) == (0, 0, 0)
    assert vllm(PREFIX_CACHE_HITS)._value.get() == hits and offload.hit_blocks == 0
    assert [x.request.request_id for x in out.scheduled] == ["other"]
    assert hit.status == RequestStatus.FINISHED and hit.finish_reason == "error" and hit.error_status == 500
    assert "CPU offload tier" in (hit.error or "") and "RuntimeError" in (hit.error or "")
    assert not bm.has_blocks("hit") and bm.num_used_blocks() == len(bm.block_ids("other")[0])
    assert bm.match_prefix(hit.all_token_ids, 3 * BS - 1).num_tokens == 0, "the failed load's blocks were cached"
    assert offload.tier.num_used_blocks() == 0, "the failed load's tier entries stayed"
    if connector is not None:
        assert connector.aborted == ["hit"] and [load[0] for load in connector.loads] == ["hit"]
    assert s.prompt_tokens_computed == 2 * BS  # the other request's prompt only
    s.after_step(out)
    for sr in out.scheduled:  # the rest of the step, as tests.engine.test_scheduler.step runs it
        if sr.needs_sample:
            sr.request.append_output_token(7)
    offload.check_integrity()
    bm.check_integrity()
    monkeypatch.undo()
    drain(s)
    assert bm.num_used_blocks() == 0 and not s.has_unfinished_requests()
    bm.check_integrity()
