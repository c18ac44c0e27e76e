"""kv_transfer.load_failure_policy recompute (default): a decode whose KV load failed computes the prompt
itself; with its old blocks still draining it waits for safe_to_free; an abort meanwhile frees them. Either policy:
the request's num_external_tokens (its prompt tokens loaded, which vllm:request_prefill_kv_computed_tokens leaves out)
goes back to 0, as none came."""

from __future__ import annotations

from pdlaunch.engine.request import RequestStatus
from pdlaunch.engine.scheduler import Scheduler
from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.metrics.kv_transfer import KV_LOAD_RECOMPUTES
from tests.engine.conftest import make_engine  # noqa: F401 - the fixture
from tests.engine.test_scheduler import BS, FakeConnector, drain, req, step


def _recomputes() -> float:
    return KV_LOAD_RECOMPUTES._value.get()


def test_failed_load_is_recomputed_from_the_first_token() -> None:
    conn = FakeConnector()
    s = Scheduler(BlockManager(32, BS), max_num_seqs=4, max_num_batched_tokens=64, connector=conn,
                  recompute_failed_loads=True)
    r = req("d", 10, max_tokens=2, params={"do_remote_prefill": True})
    s.add_request(r)
    step(s)
    assert r.num_external_tokens == 9  # all but the last prompt token, which it computes
    before = _recomputes()
    conn.events.failed_recving["d"] = "prefill engine unreachable"
    assert s.handle_connector_events(conn.get_finished()) == []
    assert r.status == RequestStatus.WAITING and not r.is_finished and _recomputes() == before + 1
    assert r.num_external_tokens == 0
    out = step(s)
    assert [(x.start, x.num_new_tokens, x.needs_sample) for x in out.scheduled] == [(0, 10, True)]
    assert len(conn.loads) == 1  # the connector is not asked a second time
    drain(s)
    assert r.finish_reason == "length" and len(r.output_token_ids) == 2
    assert s.block_manager.num_used_blocks() == 0


def test_draining_blocks_are_not_reused_until_safe_to_free() -> None:
    conn = FakeConnector()
    s = Scheduler(BlockManager(32, BS), max_num_seqs=4, max_num_batched_tokens=64, connector=conn,
                  recompute_failed_loads=True)
    r = req("d", 10, max_tokens=2, params={"do_remote_prefill": True})
    s.add_request(r)
    step(s)
    old_blocks = s.block_manager.block_ids("d")
    conn.events.failed_recving["d"] = "push failed"
    conn.events.draining.add("d")
    s.handle_connector_events(conn.get_finished())
    assert "d" in s.recomputing and step(s).scheduled == [] and s.block_manager.block_ids("d") == old_blocks
    conn.events.safe_to_free.add("d")
    s.handle_connector_events(conn.get_finished())
    assert [(x.start, x.num_new_tokens) for x in step(s).scheduled] == [(0, 10)]
    drain(s)
    assert r.finish_reason == "length" and s.block_manager.num_used_blocks() == 0


def test_abort_while_recompute_waits_keeps_blocks_until_safe_then_frees() -> None:
    conn = FakeConnector()
    s = Scheduler(BlockManager(32, BS), max_num_seqs=4, max_num_batched_tokens=64, connector=conn,
                  recompute_failed_loads=True)
    r = req("d", 10, params={"do_remote_prefill": True})
    s.add_request(r)
    step(s)
    conn.events.failed_recving["d"] = "push failed"
    conn.events.draining.add("d")
    s.handle_connector_events(conn.get_finished())
    s.finish_request(r, "abort")
    assert not s.has_unfinished_requests() and "d" in s.draining and s.block_manager.num_used_blocks() > 0
    conn.events.safe_to_free.add("d")
    s.handle_connector_events(conn.get_finished())
    assert s.block_manager.num_used_blocks() == 0


def test_fail_policy_keeps_the_error() -> None:
    conn = FakeConnector()
    s = Scheduler(BlockManager(32, BS), max_num_seqs=4, max_num_batched_tokens=64, connector=conn)
    r = req("d", 10, params={"do_remote_prefill": True})
    s.add_request(r)
    step(s)
    assert r.num_external_tokens == 9
    conn.events.failed_recving["d"] = "handshake timed out"
    assert s.handle_connector_events(conn.get_finished()) == [r] and r.finish_reason == "error"
    assert r.num_external_tokens == 0


def test_engine_recompute_answers_what_a_colocated_engine_answers(llama_ckpt, make_engine) -> None:  # type: ignore[no-untyped-def]  # noqa: F811 - the fixture imported above
    from pdlaunch.engine.outputs import SamplingParams
    from tests.engine.test_engine_connector import CopyConnector, Hub, prefill, spec

    hub = Hub()
    prompt = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    p_engine = make_engine(llama_ckpt, instance=spec("prefill", "P"), connector=CopyConnector(hub, "P"))
    d_engine = make_engine(llama_ckpt, instance=spec("decode", "D"), connector=CopyConnector(hub, "D", fail=True))
    plain = make_engine(llama_ckpt)
    (p_out,) = prefill(p_engine, [prompt])
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    d_engine.add_request("d", prompt, greedy, p_out.kv_transfer_params)
    plain.add_request("c", prompt, greedy)
    tokens: dict[str, list[int]] = {"d": [], "c": []}
    for engine in (d_engine, plain):
        for _ in range(100):
            for out in engine.step():
                assert out.finish_reason != "error", out.error
                tokens[out.request_id] += out.new_token_ids
            if not engine.has_unfinished_requests():
                break
    assert tokens["d"] == tokens["c"] and len(tokens["d"]) == 6
    assert d_engine.block_manager.num_used_blocks() == 0
    hub.notices["P"] = {p_out.request_id}
    p_engine.step()
