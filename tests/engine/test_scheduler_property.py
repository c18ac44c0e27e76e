"""Random workloads against the scheduler without a model: local, PD decode (some with their prefill's first token)
and PD prefill requests sharing prefixes, chunked prefill under a small token budget and prompt cap, preemption in a
small KV cache, async scheduling (a sampled token pending for a step), KV loads that arrive, fail (fail or recompute
policy) or drain, prefill holds, aborts and early stops at any point.

Every step keeps the budgets (max_num_batched_tokens, max_num_seqs), computes at least one token of each request it
schedules, within blocks the request holds, and keeps every request in exactly one place (the waiting queue, whose
block holders come first, running, waiting for KV, recomputing); block holders are exactly those. Every workload ends
(no request waits forever) with every block back on the free list.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlaunch.engine.kv_capacity import KVCapacity
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.request import Request, RequestStatus
from pdlaunch.engine.scheduler import Scheduler
from pdlaunch.engine.scheduler_output import SchedulerOutput
from pdlaunch.kv_transfer.base import KVConnectorEvents
from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer, RemoteDecodeRequest, wants_remote_prefill
from pdlaunch.kvcache.block_manager import BlockManager
from tests.engine.test_scheduler import FakeConnector

MAX_STEPS = 3000  # a workload of at most 12 requests of at most 40 tokens ends far sooner unless one waits forever


class DrainingConnector(FakeConnector):
    """FakeConnector whose aborted loads may still write their blocks (until a later poll says safe_to_free), and
    whose loads for a request holding its prefill's first token cover the whole prompt (decode/side.py's rule)."""

    def __init__(self, rng: random.Random, hold: bool) -> None:
        super().__init__(hold=hold)
        self.rng = rng
        self.busy: set[str] = set()
        self.first_token: set[str] = set()

    def get_num_new_matched_tokens(self, request_id: str, prompt_token_ids: list[int],
                                   kv_transfer_params: KVTransferParams | None, num_local_computed_tokens: int) -> int:
        if request_id in self.first_token and wants_remote_prefill(kv_transfer_params):
            return len(prompt_token_ids) - num_local_computed_tokens
        return super().get_num_new_matched_tokens(request_id, prompt_token_ids, kv_transfer_params,
                                                  num_local_computed_tokens)

    def abort_load(self, request_id: str) -> bool:  # type: ignore[override]
        self.aborted.append(request_id)
        if self.rng.random() < 0.5:
            self.busy.add(request_id)
            return True
        return False

    def poll(self, s: Scheduler) -> KVConnectorEvents:
        """What a poll reports: some loads arrive, some fail (half of them still draining), drains end, holds end."""
        events = KVConnectorEvents()
        for rid in list(s.waiting_for_kv):
            roll = self.rng.random()
            if roll < 0.3:
                events.finished_recving.add(rid)
            elif roll < 0.35:
                events.failed_recving[rid] = "the prefill went away"
                if self.rng.random() < 0.5:
                    events.draining.add(rid)
                    self.busy.add(rid)
        for rid in sorted(self.busy):
            if self.rng.random() < 0.2:
                events.safe_to_free.add(rid)
                self.busy.discard(rid)
        events.finished_sending.update(rid for rid in sorted(s.held) if self.rng.random() < 0.3)
        return events


def _sampled(s: Scheduler, request: Request, rng: random.Random) -> None:
    """The host learns the request's sampled token: max_tokens or an early stop may end it."""
    request.append_output_token(7)
    if len(request.output_token_ids) >= request.params.max_tokens:
        s.finish_request(request, "length")
    elif rng.random() < 0.05:
        s.finish_request(request, "stop")


def _check_step(s: Scheduler, out: SchedulerOutput) -> None:
    bm = s.block_manager
    assert out.num_batched_tokens <= s.max_num_batched_tokens
    assert len(s.running) <= s.max_num_seqs
    scheduled = [x.request.request_id for x in out.scheduled]
    assert len(scheduled) == len(set(scheduled))
    for x in out.scheduled:
        assert x.num_new_tokens >= 1 and x.end <= x.request.num_tokens
        assert x.start == x.request.num_computed_tokens and x.request.status == RequestStatus.RUNNING
        assert all(len(table) * bm.block_size >= x.end for table in bm.block_ids(x.request.request_id))


def _check_places(s: Scheduler) -> None:
    bm = s.block_manager
    bm.check_integrity()
    places = [r.request_id for r in s.waiting] + [r.request_id for r in s.running]
    places += list(s.waiting_for_kv) + list(s.recomputing)
    assert sorted(places) == sorted(s.requests)
    holds = [bm.has_blocks(r.request_id) for r in s.waiting]
    assert holds == sorted(holds, reverse=True), "a request holding blocks waits behind one without"
    assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in s.waiting)
    holders = {r.request_id for r in s.running} | set(s.waiting_for_kv) | set(s.held) | set(s.draining)
    holders |= set(s.recomputing) | {r.request_id for r in s.waiting if bm.has_blocks(r.request_id)}
    assert set(bm.tables) == holders


def _request(rng: random.Random, i: int, conn: DrainingConnector | None) -> Request:
    family = rng.randrange(3)  # requests of one family share a prefix
    prompt = [1000 * family + t for t in range(rng.randint(1, 30))]
    if rng.random() < 0.4:
        prompt = prompt[:rng.randint(0, len(prompt))] + [50_000 + 100 * i + t for t in range(rng.randint(1, 8))]
    kv: KVTransferParams | None = None
    roll = rng.random()
    if conn is not None and roll < 0.35:
        kv = PrefillAnswer(do_remote_prefill=True, remote_engine_id="p", remote_request_id=f"p-{i}")
    elif conn is not None and roll < 0.6:
        kv = RemoteDecodeRequest.model_validate({"do_remote_decode": True})
    request = Request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 10)), i, kv_transfer_params=kv)
    if conn is not None and isinstance(kv, PrefillAnswer) and request.params.max_tokens > 1 and rng.random() < 0.5:
        conn.first_token.add(request.request_id)  # its prefill's sampled token comes with it (engine/first_token.py)
        request.append_output_token(7)
    return request


def _run(rng: random.Random) -> None:
    block_size = rng.choice([1, 2, 4])
    num_blocks = rng.randint(3, 24)
    bm = BlockManager(num_blocks, block_size, sliding_windows=rng.choice([[None], [None], [None, 8], [None, 5]]))
    conn = DrainingConnector(rng, hold=rng.random() < 0.5) if rng.random() < 0.5 else None
    s = Scheduler(bm, max_num_seqs=rng.randint(1, 8), max_num_batched_tokens=rng.randint(1, 40), connector=conn,
                  recompute_failed_loads=rng.random() < 0.5, prompt_tokens_while_decoding=rng.choice([0, 0, 1, 3, 8]))
    overlap, aborts = rng.random() < 0.5, rng.random() < 0.5
    capacity = KVCapacity(num_blocks=num_blocks, block_size=block_size)
    to_add = rng.randint(1, 12)
    ids = itertools.count()
    requests: list[Request] = []
    in_flight: list[Request] = []  # async scheduling: sampled last step, read this step
    for _ in range(MAX_STEPS):
        if to_add and rng.random() < 0.4:
            to_add -= 1
            request = _request(rng, next(ids), conn)
            if capacity.refusal(request.num_prompt_tokens + request.params.max_tokens) is None:  # else: refused
                s.add_request(request)
                requests.append(request)
        if conn is not None:
            s.handle_connector_events(conn.poll(s))
        live = [r for r in requests if not r.is_finished]
        if aborts and live and rng.random() < 0.05:
            s.finish_request(rng.choice(live), "abort")
        out = s.schedule()
        _check_step(s, out)
        s.after_step(out)
        for request in in_flight:
            request.num_pending -= 1
            if not request.is_finished:
                _sampled(s, request, rng)
        sampled = [x.request for x in out.scheduled if x.needs_sample and not x.request.is_finished]
        if overlap:
            for request in sampled:
                request.num_pending += 1
            in_flight = sampled
        else:
            in_flight = []
            for request in sampled:
                _sampled(s, request, rng)
        _check_places(s)
        if not (to_add or s.has_unfinished_requests() or in_flight or s.held or s.draining or s.recomputing):
            break
    else:
        pytest.fail(f"requests still unfinished after {MAX_STEPS} steps: waiting "
                    f"{[(r.request_id, r.num_computed_tokens, r.num_tokens) for r in s.waiting]}, running "
                    f"{[r.request_id for r in s.running]}, waiting for KV {sorted(s.waiting_for_kv)}, "
                    f"{bm.num_free_blocks()} of {num_blocks} blocks free")
    assert bm.num_free_blocks() == num_blocks
    assert all(len(r.output_token_ids) == r.params.max_tokens for r in requests if r.finish_reason == "length")


@settings(max_examples=100, deadline=None)
@given(st.randoms(use_true_random=False))
def test_random_workloads_keep_budgets_and_places_and_give_every_block_back(rng: random.Random) -> None:
    _run(rng)
