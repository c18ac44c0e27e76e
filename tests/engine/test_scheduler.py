"""Scheduler without a model: budgets, chunked prefill, preemption, abort, connector states."""

from __future__ import annotations

import itertools

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.request import Request, RequestStatus
from pdlaunch.engine.scheduler import Scheduler
from pdlaunch.engine.scheduler_output import SchedulerOutput
from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector, KVConnectorEvents
from pdlaunch.kv_transfer.params import (
    KVTransferParams,
    PrefillAnswer,
    RemoteDecodeRequest,
    wants_remote_decode,
    wants_remote_prefill,
)
from pdlaunch.kvcache.block_manager import BlockManager

BS = 4
_arrival = itertools.count()


def req(rid: str, prompt_len: int, max_tokens: int = 4, params: dict[str, bool] | None = None,
        base: int | None = None) -> Request:
    """A request whose prompt is unique unless `base` is given. `params`: {"do_remote_prefill": True}
    (a decode leg: a prefill's answer) or {"do_remote_decode": ...} (a prefill leg)."""
    arrival = next(_arrival)
    start = 1000 * (arrival + 1) if base is None else base
    kv: KVTransferParams | None = None
    if params is not None and params.get("do_remote_prefill"):
        kv = PrefillAnswer(do_remote_prefill=True, remote_engine_id="p", remote_request_id=f"p-{rid}")
    elif params is not None:
        kv = RemoteDecodeRequest.model_validate(params)
    return Request(rid, list(range(start, start + prompt_len)), SamplingParams(max_tokens=max_tokens),
                   arrival, kv_transfer_params=kv)


def step(s: Scheduler) -> SchedulerOutput:
    """One engine step with a fake model: token 7 is sampled; max_tokens finishes a request."""
    out = s.schedule()
    s.after_step(out)
    for sr in out.scheduled:
        if sr.needs_sample:
            sr.request.append_output_token(7)
            if len(sr.request.output_token_ids) >= sr.request.params.max_tokens:
                s.finish_request(sr.request, "length")
    s.block_manager.check_integrity()
    return out


def drain(s: Scheduler, limit: int = 500) -> list[SchedulerOutput]:
    outs = []
    while s.has_unfinished_requests():
        outs.append(step(s))
        assert len(outs) < limit
    return outs


def test_token_and_sequence_budgets_bound_every_step() -> None:
    s = Scheduler(BlockManager(256, BS), max_num_seqs=3, max_num_batched_tokens=20)
    for i in range(8):
        s.add_request(req(f"r{i}", 5 + 3 * i))
    outs = drain(s)
    assert all(o.num_batched_tokens <= 20 and len(o.scheduled) <= 3 for o in outs)
    assert max(len(o.scheduled) for o in outs) == 3
    assert s.block_manager.num_used_blocks() == 0


def test_chunked_prefill_splits_a_long_prompt() -> None:
    s = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=16)
    r = req("long", 50, max_tokens=2)
    s.add_request(r)
    chunks = []
    for _ in range(4):
        out = step(s)
        chunks.append([(x.start, x.num_new_tokens, x.needs_sample) for x in out.scheduled])
    assert chunks == [[(0, 16, False)], [(16, 16, False)], [(32, 16, False)], [(48, 2, True)]]
    assert r.output_token_ids == [7]
    assert [(x.start, x.num_new_tokens) for x in step(s).scheduled] == [(50, 1)]
    assert r.is_finished


def test_decodes_go_first_and_share_the_budget_with_a_prefill_chunk() -> None:
    s = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=10)
    s.add_request(req("a", 3, max_tokens=10))
    step(s)
    s.add_request(req("b", 30, max_tokens=2))
    out = step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 9)]


def test_prompt_tokens_are_capped_only_in_steps_that_run_decodes() -> None:
    """prompt_tokens_while_decoding: a prompt that arrives while others decode runs in chunks of the cap beside
    them; a step with no decode (the first, and after the decodes end) takes the whole budget."""
    s = Scheduler(BlockManager(128, BS), max_num_seqs=4, max_num_batched_tokens=64, prompt_tokens_while_decoding=8)
    a = req("a", 40, max_tokens=3)
    s.add_request(a)
    first = step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in first.scheduled] == [("a", 40)]  # nothing decodes
    b, c = req("b", 30, max_tokens=1), req("c", 5, max_tokens=1)
    s.add_request(b)
    s.add_request(c)
    out = step(s)  # a decodes: b takes the 8 prompt tokens, c waits (FIFO) though the budget has room
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 8)]
    out = step(s)  # a's last token; b, running, takes the cap again
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 8)]
    assert a.is_finished
    out = step(s)  # nothing decodes (b mid-prompt, c waiting): the whole budget
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("b", 14), ("c", 5)]
    drain(s)
    assert s.block_manager.num_used_blocks() == 0


def test_no_cap_lets_a_prompt_take_the_whole_budget_beside_decodes() -> None:
    s = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=40, prompt_tokens_while_decoding=0)
    s.add_request(req("a", 3, max_tokens=10))
    step(s)
    s.add_request(req("b", 50, max_tokens=2))
    assert [(x.request.request_id, x.num_new_tokens) for x in step(s).scheduled] == [("a", 1), ("b", 39)]


def test_preemption_frees_the_newest_and_recomputes_it_later() -> None:
    # 6 blocks of 4 tokens: two requests of 9 prompt + 8 output tokens (5 blocks each) cannot both fit.
    s = Scheduler(BlockManager(6, BS), max_num_seqs=4, max_num_batched_tokens=64)
    a, b = req("a", 9, max_tokens=8), req("b", 9, max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    outs = drain(s)
    assert s.num_preemptions >= 1
    assert any("b" in o.preempted for o in outs)
    assert "a" not in {p for o in outs for p in o.preempted}
    assert a.output_token_ids == [7] * 8 and b.output_token_ids == [7] * 8
    # b ran two prefills: its prompt, then after preemption its prompt plus the tokens it had
    # generated, less what the prefix cache still held.
    prefills = [x for o in outs for x in o.scheduled if x.request is b and x.num_new_tokens > 1]
    assert len(prefills) == 2 and prefills[1].end > 9
    assert s.block_manager.num_used_blocks() == 0


def test_a_request_that_cannot_fit_alone_preempts_itself_and_waits() -> None:
    s = Scheduler(BlockManager(3, BS), max_num_seqs=4, max_num_batched_tokens=64)
    s.add_request(req("a", 4, max_tokens=20))
    for _ in range(20):
        step(s)
    r = s.requests["a"]
    assert r.status in (RequestStatus.PREEMPTED, RequestStatus.RUNNING)
    assert s.block_manager.num_used_blocks() <= 3


def test_abort_at_any_point_frees_every_block() -> None:
    for abort_after in range(6):
        s = Scheduler(BlockManager(16, BS), max_num_seqs=2, max_num_batched_tokens=8)
        rs = [req(f"r{i}", 10 + i, max_tokens=6) for i in range(4)]
        for r in rs:
            s.add_request(r)
        for _ in range(abort_after):
            step(s)
        for r in rs:
            if not r.is_finished:
                s.finish_request(r, "abort")
        s.block_manager.check_integrity()
        assert s.block_manager.num_used_blocks() == 0
        assert not s.has_unfinished_requests() and not s.running and not s.waiting


def test_prefix_hit_skips_cached_prompt_blocks() -> None:
    s = Scheduler(BlockManager(32, BS), max_num_seqs=4, max_num_batched_tokens=64)
    s.add_request(req("a", 10, max_tokens=1, base=5))
    drain(s)
    b = req("b", 10, max_tokens=1, base=5)
    s.add_request(b)
    out = step(s)
    assert [(x.start, x.num_new_tokens) for x in out.scheduled] == [(8, 2)]
    assert b.num_cached_tokens == 8
    assert s.prompt_tokens_cached == 8 and s.prompt_tokens_computed == 12


class FakeConnector(KVConnector):
    """Records calls; the test decides what get_finished reports."""

    def __init__(self, external: int = 0, hold: bool = False) -> None:
        self.external = external
        self.hold = hold
        self.loads: list[tuple[str, list[list[int]], int, int]] = []
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.events = KVConnectorEvents()

    def register_kv_caches(self, spec: KVCacheSpec) -> None:
        pass

    def get_num_new_matched_tokens(self, request_id: str, prompt_token_ids: list[int],
                                   kv_transfer_params: KVTransferParams | None, num_local_computed_tokens: int) -> int:
        if wants_remote_prefill(kv_transfer_params):
            return self.external or len(prompt_token_ids) - 1 - num_local_computed_tokens
        return 0

    def start_load(self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
                   block_ids: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int) -> None:
        self.loads.append((request_id, block_ids, num_local_computed_tokens, num_external_tokens))

    def request_finished(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None,
                         block_ids: list[list[int]]) -> tuple[bool, PrefillAnswer | None]:
        self.finished.append(request_id)
        if wants_remote_decode(kv_transfer_params):
            return self.hold, PrefillAnswer(do_remote_prefill=True, remote_engine_id="p", remote_request_id=request_id,
                                            remote_block_ids=block_ids)
        return False, None

    def get_finished(self) -> KVConnectorEvents:
        events, self.events = self.events, KVConnectorEvents()
        return events

    def abort_load(self, request_id: str) -> None:
        self.aborted.append(request_id)


def test_remote_kv_request_waits_then_recomputes_only_the_last_token() -> None:
    conn = FakeConnector()
    s = Scheduler(BlockManager(32, BS), max_num_seqs=4, max_num_batched_tokens=64, connector=conn)
    r = req("d", 10, max_tokens=2, params={"do_remote_prefill": True})
    s.add_request(r)
    for _ in range(3):
        assert step(s).scheduled == []
        s.handle_connector_events(conn.get_finished())
    assert r.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert conn.loads == [("d", s.block_manager.block_ids("d"), 0, 9)]
    assert len(conn.loads[0][1][0]) == 3  # blocks for all 10 prompt tokens
    assert s.block_manager.num_used_blocks() == 3
    conn.events.finished_recving.add("d")
    s.handle_connector_events(conn.get_finished())
    out = step(s)
    assert [(x.start, x.num_new_tokens, x.needs_sample) for x in out.scheduled] == [(9, 1, True)]
    assert r.num_cached_tokens == 0  # loaded from the prefill: not a prefix-cache hit (issue 33)
    drain(s)
    assert r.finish_reason == "length" and s.block_manager.num_used_blocks() == 0


def test_failed_remote_load_finishes_with_error_and_frees_blocks() -> None:
    conn = FakeConnector()
    s = Scheduler(BlockManager(32, BS), max_num_seqs=4, max_num_batched_tokens=64, connector=conn)
    r = req("d", 10, params={"do_remote_prefill": True})
    s.add_request(r)
    step(s)
    conn.events.failed_recving["d"] = "handshake timed out"
    failed = s.handle_connector_events(conn.get_finished())
    assert failed == [r] and r.finish_reason == "error" and "handshake timed out" in (r.error or "")
    assert s.block_manager.num_used_blocks() == 0 and not s.has_unfinished_requests()
    s.block_manager.check_integrity()


def test_abort_while_waiting_for_kv_tells_the_connector() -> None:
    conn = FakeConnector()
    s = Scheduler(BlockManager(32, BS), max_num_seqs=4, max_num_batched_tokens=64, connector=conn)
    r = req("d", 10, params={"do_remote_prefill": True})
    s.add_request(r)
    step(s)
    s.finish_request(r, "abort")
    assert conn.aborted == ["d"] and s.block_manager.num_used_blocks() == 0
    conn.events.finished_recving.add("d")  # a late report for a gone request is ignored
    s.handle_connector_events(conn.get_finished())
    s.block_manager.check_integrity()


def test_prefill_hold_keeps_blocks_until_finished_sending() -> None:
    conn = FakeConnector(hold=True)
    s = Scheduler(BlockManager(32, BS), max_num_seqs=4, max_num_batched_tokens=64, connector=conn)
    r = req("p", 10, max_tokens=1, params={"do_remote_decode": True})
    s.add_request(r)
    step(s)
    assert r.is_finished and "p" in s.held and not s.has_unfinished_requests()
    assert s.block_manager.num_used_blocks() == 3
    conn.events.finished_sending.add("p")
    s.handle_connector_events(conn.get_finished())
    assert not s.held and s.block_manager.num_used_blocks() == 0
    s.block_manager.check_integrity()


def test_abort_never_holds_blocks() -> None:
    conn = FakeConnector(hold=True)
    s = Scheduler(BlockManager(32, BS), max_num_seqs=4, max_num_batched_tokens=4, connector=conn)
    r = req("p", 10, max_tokens=1, params={"do_remote_decode": True})
    s.add_request(r)
    step(s)
    assert s.finish_request(r, "abort") is None
    assert not s.held and s.block_manager.num_used_blocks() == 0


def test_a_request_whose_kv_arrived_runs_beside_decodes_after_the_prompt_cap_is_spent() -> None:
    """A decode whose prompt's KV came through the connector computes only its last prompt token, a decode's row:
    a step whose prompt tokens (prompt_tokens_while_decoding) a local prompt spent still admits it; a request whose
    KV arrived only in part still counts its prompt tokens against the cap."""
    conn = FakeConnector()
    s = Scheduler(BlockManager(128, BS), max_num_seqs=8, max_num_batched_tokens=64, prompt_tokens_while_decoding=8,
                  connector=conn)
    a = req("a", 3, max_tokens=10)
    s.add_request(a)
    step(s)  # a decodes from now on
    d = req("d", 10, max_tokens=2, params={"do_remote_prefill": True})
    s.add_request(d)
    s.add_request(req("b", 30, max_tokens=1))
    step(s)  # d's load starts; b runs its first 8 prompt tokens beside a
    conn.events.finished_recving.add("d")
    s.handle_connector_events(conn.get_finished())
    out = s.schedule()  # b, running, takes this step's 8 prompt tokens before any admission
    got = [(x.request.request_id, x.num_new_tokens) for x in out.scheduled]
    assert ("a", 1) in got and ("d", 1) in got, got
    assert sum(n for rid, n in got if rid not in ("a", "d")) <= 8, got


def test_a_pd_request_starts_its_load_in_a_step_whose_prompt_cap_is_spent() -> None:
    """Starting a KV load computes nothing: a PD request is consulted (its blocks allocated, its load started) even in
    a step whose prompt tokens running prompts took; a local prompt behind it still waits for the cap."""
    conn = FakeConnector()
    s = Scheduler(BlockManager(128, BS), max_num_seqs=8, max_num_batched_tokens=64, prompt_tokens_while_decoding=8,
                  connector=conn)
    s.add_request(req("a", 3, max_tokens=10))
    step(s)  # a decodes from now on
    s.add_request(req("b", 30, max_tokens=1))
    step(s)  # b runs its first 8 prompt tokens beside a
    d = req("d", 10, max_tokens=2, params={"do_remote_prefill": True})
    s.add_request(d)
    s.add_request(req("c", 5, max_tokens=1))
    out = step(s)  # b, running, takes this step's 8 prompt tokens first
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 8)]
    assert [load[0] for load in conn.loads] == ["d"] and d.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert [r.request_id for r in s.waiting] == ["c"]
    conn.events.finished_recving.add("d")
    s.handle_connector_events(conn.get_finished())
    drain(s)
    assert d.finish_reason == "length" and s.block_manager.num_used_blocks() == 0


def test_a_pd_request_whose_prefix_is_all_local_computes_later_within_the_cap() -> None:
    """A PD request consulted past a spent cap whose connector has nothing to load (its prompt cached here but for
    its last token) waits, blocks allocated, and runs that one token in a later step, as a decode's row."""
    conn = FakeConnector(external=0)
    s = Scheduler(BlockManager(128, BS), max_num_seqs=8, max_num_batched_tokens=64, prompt_tokens_while_decoding=8,
                  connector=conn)
    s.add_request(req("a", 3, max_tokens=10))
    step(s)
    shared = req("p", 13, max_tokens=1, base=500)
    s.add_request(shared)
    drain_until = 0
    while not shared.is_finished and drain_until < 20:
        step(s)
        drain_until += 1
    s.add_request(req("b", 30, max_tokens=1))
    step(s)  # b takes the cap from now on
    d = req("d", 13, max_tokens=2, params={"do_remote_prefill": True}, base=500)  # p's prompt: all but 1 token cached
    s.add_request(d)
    out = step(s)
    assert ("d", 0) not in [(x.request.request_id, x.num_new_tokens) for x in out.scheduled]
    drain(s)
    assert d.finish_reason == "length" and s.block_manager.num_used_blocks() == 0


def test_a_request_whose_kv_arrived_leaves_a_local_prompt_only_the_budget_it_left() -> None:
    """A decode row (a PD request whose prompt's KV arrived) takes a token of the step's budget though not of its prompt
    cap: a local prompt admitted after it gets what is left, so the step never exceeds max_num_batched_tokens (it did
    by one per such row: 4 tokens in a step of 3)."""
    conn = FakeConnector()
    s = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=3, connector=conn)
    s.add_request(req("a", 3, max_tokens=10))
    step(s)  # a decodes from now on
    s.add_request(req("d", 10, max_tokens=2, params={"do_remote_prefill": True}))
    step(s)  # d's load starts
    conn.events.finished_recving.add("d")
    s.handle_connector_events(conn.get_finished())
    s.add_request(req("b", 5, max_tokens=1))
    out = step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("d", 1), ("b", 1)]
    assert out.num_batched_tokens == 3
