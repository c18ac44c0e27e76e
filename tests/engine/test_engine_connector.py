"""The engine side of KV transfer, with an in-process connector that copies blocks between two
engines (the real NIXL path is tested in tests/kv_transfer)."""

from __future__ import annotations

import random

import pytest

from pdlaunch.config.deployment_config import InstanceSpec
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.errors import EngineError
from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector, KVConnectorEvents
from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer, wants_remote_decode, wants_remote_prefill
from tests.engine.conftest import MakeEngine, run_all


class Hub:
    """What the network would be: registered caches and 'you may free it' notifications."""

    def __init__(self) -> None:
        self.specs: dict[str, KVCacheSpec] = {}
        self.notices: dict[str, set[str]] = {}


class CopyConnector(KVConnector):
    def __init__(self, hub: Hub, engine_id: str, fail: bool = False) -> None:
        self.hub, self.engine_id, self.fail = hub, engine_id, fail
        self.loading: set[str] = set()
        self.aborted: list[str] = []
        self.released: list[str] = []  # release_unloaded: requests that ended before their load started
        self.calls: list[tuple[str, int, int]] = []

    def register_kv_caches(self, spec: KVCacheSpec) -> None:
        self.spec = spec
        self.hub.specs[self.engine_id] = spec

    def get_num_new_matched_tokens(self, request_id: str, prompt_token_ids: list[int],
                                   kv_transfer_params: KVTransferParams | None, num_local_computed_tokens: int) -> int:
        if wants_remote_prefill(kv_transfer_params):
            return len(prompt_token_ids) - 1 - num_local_computed_tokens
        return 0

    def start_load(self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
                   block_ids: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int) -> None:
        assert isinstance(kv_transfer_params, PrefillAnswer) and kv_transfer_params.remote_block_ids is not None
        self.calls.append((request_id, num_local_computed_tokens, num_external_tokens))
        remote = self.hub.specs[kv_transfer_params.remote_engine_id]
        bs = self.spec.block_size
        first, end = num_local_computed_tokens // bs, -(-(num_local_computed_tokens + num_external_tokens) // bs)
        if not self.fail:
            for g, (local_ids, remote_ids) in enumerate(zip(block_ids, kv_transfer_params.remote_block_ids)):
                for j in range(first, end):
                    if local_ids[j] >= 0 and remote_ids[j] >= 0:
                        self.spec.kv_caches[g][local_ids[j]].copy_(remote.kv_caches[g][remote_ids[j]])
            self.hub.notices.setdefault(kv_transfer_params.remote_engine_id, set()).add(
                kv_transfer_params.remote_request_id)
        self.loading.add(request_id)

    def request_finished(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None,
                         block_ids: list[list[int]]) -> tuple[bool, PrefillAnswer | None]:
        if wants_remote_decode(kv_transfer_params):
            return True, PrefillAnswer(do_remote_prefill=True, remote_engine_id=self.engine_id,
                                       remote_block_ids=block_ids, remote_request_id=request_id)
        return False, None

    def get_finished(self) -> KVConnectorEvents:
        events = KVConnectorEvents(finished_sending=self.hub.notices.pop(self.engine_id, set()))
        if self.fail:
            events.failed_recving = {rid: "peer went away" for rid in self.loading}
        else:
            events.finished_recving = set(self.loading)
        self.loading.clear()
        return events

    def abort_load(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.loading.discard(request_id)

    def release_unloaded(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None) -> None:
        assert isinstance(kv_transfer_params, PrefillAnswer)
        self.released.append(request_id)


def spec(role: str, engine_id: str) -> InstanceSpec:
    return InstanceSpec(role=role, port=8100 if role == "prefill" else 8200, engine_id=engine_id)  # type: ignore[arg-type]


def prefill(engine: LLMEngine, prompts: list[list[int]]) -> list[RequestOutput]:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    outs = []
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params, kv_transfer_params={"do_remote_decode": True})
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.finished)
    return sorted(outs, key=lambda o: int(o.request_id[1:]))


def prompts_with_shared_prefix() -> list[list[int]]:
    rng = random.Random(11)
    # 3 shared blocks: the last prompt's hit (24 tokens) reads sliding-window block 2 (positions 18..23),
    # which the load of the prompt before moved; a shorter hit would need a block no load moves.
    shared = [rng.randrange(500) for _ in range(24)]
    return [[rng.randrange(500) for _ in range(n)] for n in (1, 9, 30)] + [shared + [7, 8, 9], shared + [1]]


def test_pd_pair_matches_colocated_and_frees_held_blocks(hybrid_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    prompts = prompts_with_shared_prefix()
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    reference = [o.output_token_ids for o in run_all(make_engine(hybrid_ckpt), prompts, greedy)]

    hub = Hub()
    p_conn, d_conn = CopyConnector(hub, "P"), CopyConnector(hub, "D")
    p_engine = make_engine(hybrid_ckpt, instance=spec("prefill", "P"), connector=p_conn, max_num_batched_tokens=16)
    d_engine = make_engine(hybrid_ckpt, instance=spec("decode", "D"), connector=d_conn)
    assert p_engine.role == "prefill" and p_engine.connector is p_conn and hub.specs["P"].kv_caches[0].is_contiguous()

    assert p_engine.is_quiescent() and d_engine.is_quiescent()
    p_outs = prefill(p_engine, prompts)
    assert not p_engine.has_unfinished_requests() and not p_engine.is_quiescent()  # held for the decode
    assert [o.output_token_ids for o in p_outs] == [r[:1] for r in reference]
    assert all(o.kv_transfer_params and o.kv_transfer_params["remote_engine_id"] == "P" for o in p_outs)
    assert p_engine.stats()["num_held"] == len(prompts) and p_engine.block_manager.num_used_blocks() > 0
    p_engine.check_integrity()

    d_outs: dict[str, RequestOutput] = {}
    for batch in (p_outs[:-1], p_outs[-1:]):  # the last prompt shares a prefix with the one before
        for o in batch:
            d_engine.add_request(o.request_id, prompts[int(o.request_id[1:])], greedy, o.kv_transfer_params)
        assert not d_engine.is_quiescent()
        while d_engine.has_unfinished_requests():
            d_outs.update({o.request_id: o for o in d_engine.step() if o.finished})
            d_engine.check_integrity()
    assert [d_outs[f"p{i}"].output_token_ids for i in range(len(prompts))] == reference
    # Every prompt token but the last came from the prefill side (or the decode's own prefix cache);
    # cached_tokens counts only the decode's own prefix-cache hits (issue 33), not what was loaded.
    local = {rid: k for rid, k, _ in d_conn.calls}
    assert [local[f"p{i}"] + ext for i, (_, _, ext) in enumerate(sorted(d_conn.calls, key=lambda c: int(c[0][1:])))] \
        == [len(p) - 1 for p in prompts]
    assert [d_outs[f"p{i}"].num_cached_tokens for i in range(len(prompts))] == \
        [local[f"p{i}"] for i in range(len(prompts))]
    assert any(k > 0 for k in local.values())  # the shared prefix hit the decode's local cache
    assert d_engine.stats()["prompt_tokens_computed"] == len(prompts)

    p_engine.step()  # the notifications arrive: held blocks go back
    assert p_engine.stats()["num_held"] == 0 and p_engine.block_manager.num_used_blocks() == 0
    assert p_engine.is_quiescent() and d_engine.is_quiescent()


def test_failed_load_finishes_with_error_and_frees_blocks(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    hub = Hub()
    p_engine = make_engine(llama_ckpt, instance=spec("prefill", "P"), connector=CopyConnector(hub, "P"))
    d_conn = CopyConnector(hub, "D", fail=True)
    d_engine = make_engine(llama_ckpt, instance=spec("decode", "D"), connector=d_conn)
    d_engine.scheduler.recompute_failed_loads = False  # kv_transfer.load_failure_policy: fail
    (p_out,) = prefill(p_engine, [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    d_engine.add_request("d", [3, 4, 5, 6, 7, 8, 9, 10, 11, 12], SamplingParams(max_tokens=4), p_out.kv_transfer_params)
    outs = d_engine.step() + d_engine.step()
    assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason == "error"
    assert "peer went away" in (outs[0].error or "") and outs[0].kv_transfer_params is None
    assert d_engine.block_manager.num_used_blocks() == 0 and not d_engine.has_unfinished_requests()
    # The prefill side keeps its blocks until its connector says so (the lease, here by hand).
    assert p_engine.stats()["num_held"] == 1
    hub.notices["P"] = {p_out.request_id}
    p_engine.step()
    assert p_engine.block_manager.num_used_blocks() == 0


def test_abort_while_waiting_for_kv(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    hub = Hub()
    p_engine = make_engine(llama_ckpt, instance=spec("prefill", "P"), connector=CopyConnector(hub, "P"))
    d_conn = CopyConnector(hub, "D")
    d_engine = make_engine(llama_ckpt, instance=spec("decode", "D"), connector=d_conn)
    (p_out,) = prefill(p_engine, [list(range(40, 60))])
    d_engine.add_request("d", list(range(40, 60)), SamplingParams(max_tokens=4), p_out.kv_transfer_params)
    d_conn.get_finished = lambda: KVConnectorEvents()  # type: ignore[method-assign]  # the load never completes
    d_engine.step()
    assert d_engine.stats()["num_waiting_for_kv"] == 1 and d_engine.block_manager.num_used_blocks() == 3
    out = d_engine.abort_request("d")
    assert out is not None and out.finish_reason == "abort" and d_conn.aborted == ["d"]
    assert d_engine.block_manager.num_used_blocks() == 0
    p_engine.step()
    assert p_engine.block_manager.num_used_blocks() == 0  # the load had notified the prefill side


def test_abort_of_a_waiting_request_tells_the_connector(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    """A request aborted before it got blocks may have been matched already (the storage connector
    plans its load then): the connector must hear of the abort so that nothing it planned lingers."""
    d_conn = CopyConnector(Hub(), "D")
    d_engine = make_engine(llama_ckpt, instance=spec("decode", "D"), connector=d_conn)
    d_engine.add_request("w", [3, 4, 5, 6], SamplingParams(max_tokens=4))
    d_engine.abort_request("w")
    assert d_conn.aborted == ["w"]
    assert not d_engine.has_unfinished_requests() and d_engine.block_manager.num_used_blocks() == 0
    d_engine.check_integrity()


def test_release_by_client_id_frees_the_holds_of_that_client_only(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    # A proxy whose client left while the prefill leg's answer was on its way names the leg's X-Request-Id: the
    # engine request ids are "{client id}-{8 hex}", one per choice.
    hub = Hub()
    engine = make_engine(llama_ckpt, instance=spec("prefill", "P"), connector=CopyConnector(hub, "P"))
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for rid in ("pd-c1-0000aaaa", "pd-c1-0000bbbb", "pd-c2-0000cccc"):
        engine.add_request(rid, [5, 6, 7, 8, 9], params, kv_transfer_params={"do_remote_decode": True})
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats()["num_held"] == 3
    released: list[str] = []
    engine.connector.release_held = lambda rid: released.append(rid) or True  # type: ignore[method-assign,union-attr]
    assert engine.release_held_kv_of_client("pd-c1") == 2 and sorted(released) == ["pd-c1-0000aaaa", "pd-c1-0000bbbb"]
    assert engine.release_held_kv_of_client("pd-c") == 0  # whole ids only, never a prefix


def test_a_decode_request_that_ends_before_its_load_started_has_the_prefill_told(  # type: ignore[no-untyped-def]
        llama_ckpt, make_engine: MakeEngine) -> None:
    """connector.release_unloaded for a request with a remote prefill's params that ends before start_load (the
    prefill still holds its KV for it): aborted while queued, refused by add_request, or failed by a connector call
    that raised while it was admitted (before or inside start_load). Not for a request whose load started (abort_load
    ends that one), nor one without such params, nor one refused for this instance's state (its id in use)."""
    hub = Hub()
    p_engine = make_engine(llama_ckpt, instance=spec("prefill", "P"), connector=CopyConnector(hub, "P"))
    prompt = list(range(40, 60))
    outs = prefill(p_engine, [prompt] * 5)
    d_conn = CopyConnector(hub, "D")
    d_engine = make_engine(llama_ckpt, instance=spec("decode", "D"), connector=d_conn, max_model_len=64)
    params = SamplingParams(max_tokens=4, temperature=0.0)

    d_engine.add_request("queued", prompt, params, outs[0].kv_transfer_params)
    d_engine.add_request("local", prompt, params)
    d_engine.abort_request("queued")
    d_engine.abort_request("local")
    assert d_conn.released == ["queued"]

    with pytest.raises(EngineError, match="max_model_len"):
        d_engine.add_request("refused", prompt, SamplingParams(max_tokens=60), outs[1].kv_transfer_params)
    d_engine.add_request("loading", prompt, params, outs[2].kv_transfer_params)
    with pytest.raises(EngineError, match="already in use"):  # the request of that id may be loading these params
        d_engine.add_request("loading", prompt, params, outs[2].kv_transfer_params)
    d_conn.get_finished = lambda: KVConnectorEvents()  # type: ignore[method-assign]  # the load never completes
    d_engine.step()
    assert d_conn.loading == {"loading"}
    d_engine.abort_request("loading")  # its load started: abort_load tells the prefill
    assert d_conn.released == ["queued", "refused"] and d_conn.aborted[-1] == "loading"

    for failing, rid, out in (("get_num_new_matched_tokens", "consult-raised", outs[3]),
                              ("start_load", "start-raised", outs[4])):
        def fail(*args: object) -> int:
            raise RuntimeError("connector bug")

        setattr(d_conn, failing, fail)
        d_engine.add_request(rid, prompt, params, out.kv_transfer_params)
        (failed,) = [o for o in d_engine.step() if o.request_id == rid]
        assert failed.finished and failed.finish_reason == "error"
        delattr(d_conn, failing)
    assert d_conn.released == ["queued", "refused", "consult-raised", "start-raised"]
    assert not d_engine.has_unfinished_requests() and d_engine.block_manager.num_used_blocks() == 0
