"""KV lifecycle safety with the real NIXL (UCX over DRAM): no spurious holds, no write into freed
blocks, no read of freed blocks.

1. An aborted prefill request leaves no hold behind (no lease expiry counted for it).
2. Push: decode gives up (abort or timeout) while prefill's WRITE is still coming; the blocks are
   reported safe_to_free only after the WRITE ended, and nothing lands in them afterwards.
3. Pull: decode's READ outlasts prefill's lease; the claimed hold is not freed (nor its blocks
   reused) before the READ finished.
Delays are injected into the agent's `transfer` of one side: a WRITE posted late, a READ that starts late
after its post returned (an asynchronous READ on a GPU runs while the connector goes on).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.request import Request
from pdlaunch.engine.scheduler import Scheduler
from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector, KVConnectorEvents
from pdlaunch.kv_transfer.decode.load import load_id
from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer, RemoteDecodeRequest
from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.metrics.kv_transfer import KV_EXPIRED_REQUESTS
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.engine_procs import pd_config
from tests.kv_transfer.pd_procs import build_connector, wait_events
from tests.kv_transfer.rpc import Built, ProcessRPC

BLOCK_SIZE = 4
SENTINEL = -7.0
SLOW_SECONDS = 2.0  # injected delay of the slow side's transfer


def _until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.01)


def _wait(side: ProcessRPC, predicate: Any, what: str, timeout: float = 30.0) -> KVConnectorEvents:
    """Poll side's get_finished, merging every field, until predicate(merged) holds."""
    return wait_events(lambda: side.call("get_finished"), predicate, timeout, what)


# -- 1. aborted prefill requests ------------------------------------------------------------------
def test_aborted_prefill_request_leaves_no_hold(llama_ckpt: Path) -> None:
    config = pd_config(str(llama_ckpt), "nixl", "pull", max_num_batched_tokens=8)
    config.kv_transfer.kv_lease_seconds = 0.3
    engine = LLMEngine(config, InstanceSpec(role="prefill", port=1, engine_id="P-abort", device="cpu"))
    try:
        expired = KV_EXPIRED_REQUESTS._value.get()
        greedy = SamplingParams(max_tokens=1, temperature=0.0)
        engine.add_request("aborted", list(range(3, 35)), greedy, {"do_remote_decode": True})
        engine.add_request("finished", list(range(40, 45)), greedy, {"do_remote_decode": True})
        engine.step()  # chunked prefill: 8 of the 32 prompt tokens
        assert engine.abort_request("aborted") is not None
        engine.check_integrity()
        outs = {}
        while engine.has_unfinished_requests():
            outs.update({o.request_id: o for o in engine.step() if o.finished})
            engine.check_integrity()
        assert outs["finished"].kv_transfer_params is not None  # a normal finish is held for decode
        assert engine.connector is not None and engine.connector.info()["held_requests"] == 1
        _until(lambda: not engine.step() and not engine.scheduler.held, "the lease of the finished request")
        engine.check_integrity()
        assert engine.block_manager.num_used_blocks() == 0
        assert engine.connector.info()["held_requests"] == 0
        # Only the finished request's lease expired: the aborted one was never held.
        assert KV_EXPIRED_REQUESTS._value.get() - expired == 1
    finally:
        engine.shutdown()


class _DrainingConnector(KVConnector):
    """abort_load says a transfer may still write; the test reports safe_to_free by hand."""

    def __init__(self) -> None:
        self.events = KVConnectorEvents()

    def register_kv_caches(self, spec: KVCacheSpec) -> None:
        pass

    def get_num_new_matched_tokens(self, request_id: str, prompt_token_ids: list[int],
                                   kv_transfer_params: KVTransferParams | None, num_local_computed_tokens: int) -> int:
        return len(prompt_token_ids) - 1 - num_local_computed_tokens

    def start_load(self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
                   block_ids: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int) -> None:
        pass

    def request_finished(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None,
                         block_ids: list[list[int]]) -> tuple[bool, PrefillAnswer | None]:
        return False, None

    def get_finished(self) -> KVConnectorEvents:
        events, self.events = self.events, KVConnectorEvents()
        return events

    def abort_load(self, request_id: str) -> bool:
        return True


@pytest.mark.parametrize("how", ["abort", "failure"])
def test_scheduler_keeps_draining_blocks_until_safe_to_free(how: str) -> None:
    conn = _DrainingConnector()
    s = Scheduler(BlockManager(16, BLOCK_SIZE), max_num_seqs=4, max_num_batched_tokens=64, connector=conn)
    answer = PrefillAnswer(do_remote_prefill=True, remote_engine_id="p", remote_request_id="p-d")
    request = Request("d", list(range(10)), SamplingParams(max_tokens=2), 0, answer)
    s.add_request(request)
    s.schedule()
    assert "d" in s.waiting_for_kv and s.block_manager.num_used_blocks() == 3
    if how == "abort":
        s.finish_request(request, "abort")
    else:
        conn.events = KVConnectorEvents(failed_recving={"d": "timed out"}, draining={"d"})
        assert s.handle_connector_events(conn.get_finished()) == [request]
    assert request.is_finished and "d" in s.draining and s.block_manager.num_used_blocks() == 3
    s.handle_connector_events(KVConnectorEvents())
    assert s.block_manager.num_used_blocks() == 3
    s.handle_connector_events(KVConnectorEvents(safe_to_free={"d"}))
    assert not s.draining and s.block_manager.num_used_blocks() == 0
    s.block_manager.check_integrity()


# -- two connector processes with a slow side ----------------------------------------------------
class LateRead:
    """A READ whose post returned at once but that starts SLOW_SECONDS later (the agent's real transfer,
    posted then from a thread): "PROC" until it has started and ended."""

    def __init__(self, transfer: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.num_bytes = sum(n for _, n in args[0])
        self.error: str | None = None
        self._lock = threading.Lock()
        self._real: Any = None
        self._cancelled = False
        self._failed = False
        threading.Thread(target=self._post, args=(transfer, args), daemon=True).start()

    def _post(self, transfer: Callable[..., Any], args: tuple[Any, ...]) -> None:
        time.sleep(SLOW_SECONDS)
        with self._lock:
            if self._cancelled:
                return
            try:
                self._real = transfer("READ", *args)
            except Exception as e:  # noqa: BLE001 - reported through state(), as a failed post would be
                self._failed, self.error = True, f"{type(e).__name__}: {e}"

    def state(self) -> str:
        with self._lock:
            if self._failed:
                return "ERR"
            if self._real is None:
                return "PROC"
            state: str = self._real.state()
            self.error = self._real.error
            return state

    def release(self) -> None:
        with self._lock:
            self._cancelled = True
            real = self._real
        if real is not None:
            real.release()


def build_slow_connector(config_json: str, instance_json: str, spec_kwargs: dict[str, Any], slow_op: str,
                         staging_slots: int = 0) -> Built:
    """build_connector plus: a `slow_op` "WRITE" is posted SLOW_SECONDS late (after every check that
    precedes posting it), a `slow_op` "READ" starts SLOW_SECONDS after its post returned (LateRead); and
    fill(group, ids, value) overwrites blocks. staging_slots: KV moves through a staging buffer of that many
    slots (what a CuMem KV cache gets on CUDA)."""
    from pdlaunch.kv_transfer import nixl_connector

    made: list[Any] = []
    started: list[str] = []  # slow transfers begun
    slow = {"op": slow_op}  # "set_slow" changes it (a warm-up load runs at full speed)
    original_init = nixl_connector.NixlConnector.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        made.append(self)
        transfer = self.agent.transfer

        def slow_transfer(op: str, *a: Any) -> Any:
            if op == slow["op"]:
                started.append(op)
                if op == "READ":
                    return LateRead(transfer, a)
                time.sleep(SLOW_SECONDS)
            return transfer(op, *a)

        self.agent.transfer = slow_transfer

    nixl_connector.NixlConnector.__init__ = init  # type: ignore[method-assign]
    handlers, close, info = build_connector(config_json, instance_json, spec_kwargs, staging_slots)
    connector = made[0]

    def fill(group: int, ids: list[int], value: float) -> None:
        assert connector.spec is not None
        connector.spec.kv_caches[group][torch.tensor(ids, dtype=torch.long)] = value

    def set_slow(op: str) -> None:
        slow["op"] = op

    return {**handlers, "fill": fill, "slow_started": lambda: len(started), "set_slow": set_slow}, close, info


class SlowConnectorProcess(ProcessRPC):
    def __init__(self, config: DeploymentConfig, instance: InstanceSpec, slow_op: str, staging_slots: int = 0,
                 **spec_kwargs: Any) -> None:
        super().__init__(build_slow_connector, config.model_dump_json(), instance.model_dump_json(), spec_kwargs,
                         slow_op, staging_slots)


def _config(mode: str, transfer_timeout: float = 20.0, lease: float = 60.0) -> DeploymentConfig:
    kv = KVTransferConfig(transfer_mode=mode, verify_kv=True, handshake_timeout_seconds=3.0,
                          transfer_timeout_seconds=transfer_timeout, kv_lease_seconds=lease, engine_id="unused")
    return secured(DeploymentConfig(device="cpu", kv_transfer=kv))


def _pair(config: DeploymentConfig, slow: str, slow_op: str, staged: str = "") -> Iterator[tuple[Any, Any]]:
    """staged: the role ("prefill" | "decode") whose KV moves through a staging buffer (4 slots), "" none."""
    spec = dict(block_size=BLOCK_SIZE, num_blocks=16)
    sides: list[Any] = []
    try:
        for role, seed in (("prefill", 1), ("decode", 2)):
            instance = InstanceSpec(role=role, port=seed, engine_id=f"engine-{role}", device="cpu")
            sides.append(SlowConnectorProcess(config, instance, slow_op if role == slow else "",
                                              4 if role == staged else 0, seed=seed, **spec))
        yield sides[0], sides[1]
    finally:
        for side in sides:
            side.close()


P_IDS, D_IDS, PROMPT = [[2, 3, 4]], [[9, 10, 11]], list(range(100, 111))  # 10 positions move: 3 blocks


# -- 2. push: decode gives up while the WRITE is coming -----------------------------------------
@pytest.mark.parametrize("staged", ["", "prefill"], ids=["direct", "prefill-staging"])
@pytest.mark.parametrize("how", ["abort", "timeout"])
@pytest.mark.slow
def test_push_blocks_are_freed_only_after_the_write_ended(how: str, staged: str) -> None:
    """prefill-staging: the prefill copies its blocks into staging slots and WRITEs them straight into
    decode's blocks (a staged push, in chunks): the same safety holds."""
    config = _config("push", transfer_timeout=1.5 if how == "timeout" else 20.0)
    for prefill, decode in _pair(config, slow="prefill", slow_op="WRITE", staged=staged):
        source = prefill.call("blocks", 0, P_IDS[0])
        hold, params = prefill.call("request_finished", "r", PROMPT, RemoteDecodeRequest(do_remote_decode=True), P_IDS)
        assert hold
        decode.call("start_load", "r", PROMPT, params, D_IDS, 0, len(PROMPT) - 1)
        merged = KVConnectorEvents()
        if how == "abort":
            # The push request reached prefill; its WRITE is held back by SLOW_SECONDS.
            _until(lambda: prefill.call("slow_started") == 1, "prefill to start its WRITE")
            assert decode.call("abort_load", "r") is True  # the engine must keep the blocks
        else:
            merged = _wait(decode, lambda e: "r" in e.failed_recving, what="the load to time out")
            assert "did not arrive within 1.5s" in merged.failed_recving["r"]
            assert prefill.call("slow_started") == 1
            assert "r" in merged.draining
        if "r" not in merged.safe_to_free:
            merged = _wait(decode, lambda e: "r" in e.safe_to_free, what="safe_to_free")
        assert not merged.finished_recving
        # Freed now: an engine would hand the blocks to another request. Nothing may land any more.
        decode.call("fill", 0, D_IDS[0], SENTINEL)
        _wait(prefill, lambda e: "r" in e.finished_sending, what="prefill freeing the hold")
        time.sleep(0.5)  # room for a (buggy) late WRITE to land
        after = decode.call("blocks", 0, D_IDS[0])
        assert torch.all(after == SENTINEL), "bytes landed in decode blocks after they were freed"
        assert torch.equal(prefill.call("blocks", 0, P_IDS[0]), source)


# -- 3. pull: decode's READ outlasts the prefill lease ------------------------------------------
def _warm_up(prefill: Any, decode: Any, warm: bool) -> None:
    """warm: one whole pull first (other blocks, nothing slowed), so that the next load is one from a
    prefill engine the decode has shaken hands with (the steady state); otherwise the next load is the
    first, and shakes hands itself."""
    if not warm:
        return
    decode.call("set_slow", "")
    _, params = prefill.call("request_finished", "w", PROMPT, RemoteDecodeRequest(do_remote_decode=True), [[5, 6, 7]])
    decode.call("start_load", "w", PROMPT, params, [[12, 13, 14]], 0, len(PROMPT) - 1)
    _wait(decode, lambda e: "w" in e.finished_recving, what="the warm-up load")
    _wait(prefill, lambda e: "w" in e.finished_sending, what="prefill freeing the warm-up hold")
    decode.call("set_slow", "READ")


@pytest.mark.parametrize("staged", ["", "decode", "prefill"], ids=["direct", "decode-staging", "prefill-staging"])
@pytest.mark.parametrize("warm", [False, True], ids=["first-load", "after-a-handshake"])
@pytest.mark.slow
def test_pull_read_keeps_prefill_blocks_past_the_lease(warm: bool, staged: str) -> None:
    """decode-staging: decode READs the prefill's blocks into its staging slots (a staged pull): the READ
    must claim the hold just the same. prefill-staging: decode READs the prefill's staging slots; its stage
    request claims the hold, which ends with its read_done, not at the lease."""
    config = _config("pull", transfer_timeout=20.0, lease=0.5)
    for prefill, decode in _pair(config, slow="decode", slow_op="READ", staged=staged):
        _warm_up(prefill, decode, warm)
        expired = prefill.call("metric", "KV_EXPIRED_REQUESTS")
        source = prefill.call("blocks", 0, P_IDS[0])
        _, params = prefill.call("request_finished", "r", PROMPT, RemoteDecodeRequest(do_remote_decode=True), P_IDS)
        decode.call("start_load", "r", PROMPT, params, D_IDS, 0, len(PROMPT) - 1)
        deadline = time.monotonic() + 30.0
        decoded = KVConnectorEvents()
        freed = False
        while "r" not in decoded.finished_recving and "r" not in decoded.failed_recving:
            assert time.monotonic() < deadline, "the load did not end within 30s"
            if "r" in prefill.call("get_finished").finished_sending:
                freed = True
                prefill.call("fill", 0, P_IDS[0], SENTINEL)  # freed blocks get reused at once
            ev = decode.call("get_finished")
            decoded.finished_recving |= ev.finished_recving
            decoded.failed_recving.update(ev.failed_recving)
            time.sleep(0.01)
        assert "r" in decoded.finished_recving, decoded.failed_recving.get("r")
        # Had prefill freed (and refilled) its blocks before the READ, decode would hold sentinels.
        assert torch.equal(decode.call("blocks", 0, D_IDS[0]), source)
        if not freed:
            _wait(prefill, lambda e: "r" in e.finished_sending, what="prefill freeing after read_done")
        assert prefill.call("metric", "KV_EXPIRED_REQUESTS") == expired  # read_done, not the lease


@pytest.mark.parametrize("warm", [False, True], ids=["first-load", "after-a-handshake"])
@pytest.mark.slow
def test_pull_claim_after_the_lease_fails_cleanly(warm: bool) -> None:
    config = _config("pull", transfer_timeout=20.0, lease=0.3 if not warm else 2.0)
    for prefill, decode in _pair(config, slow="", slow_op=""):
        _warm_up(prefill, decode, warm)
        decode.call("set_slow", "")
        _, params = prefill.call("request_finished", "r", PROMPT, RemoteDecodeRequest(do_remote_decode=True), P_IDS)
        _wait(prefill, lambda e: "r" in e.finished_sending, what="the lease to expire")
        decode.call("start_load", "r", PROMPT, params, D_IDS, 0, len(PROMPT) - 1)
        ev = _wait(decode, lambda e: "r" in e.failed_recving or "r" in e.finished_recving, "the load")
        assert "not held here any more" in ev.failed_recving["r"]
        # The refused claim failed the load; its READ ended before the blocks were reported free (in the same
        # polls as the failure when the READ was already over: then there is nothing more to wait for).
        if "r" in ev.draining and "r" not in ev.safe_to_free:
            _wait(decode, lambda e: "r" in e.safe_to_free, what="the READ to drain")


@pytest.mark.slow
def test_a_second_decode_given_the_same_params_after_the_first_read_fails_cleanly() -> None:
    """The proxy retries a decode leg whose decode died on another decode, with the prefill's params: if the first
    decode already READ the blocks (its read_done freed them, and another prompt may reuse them), the second one's
    load fails (its engine computes the prompt itself) instead of loading whatever the blocks hold now."""
    config = _config("pull", transfer_timeout=20.0, lease=60.0)
    config.kv_transfer.verify_kv = False  # the default: no checksum would catch the wrong bytes
    spec = dict(block_size=BLOCK_SIZE, num_blocks=16)
    sides: list[Any] = []
    try:
        for role, seed, engine_id in (("prefill", 1, "engine-prefill"), ("decode", 2, "engine-decode-0"),
                                      ("decode", 3, "engine-decode-1")):
            instance = InstanceSpec(role=role, port=seed, engine_id=engine_id, device="cpu")
            sides.append(SlowConnectorProcess(config, instance, "", seed=seed, **spec))
        prefill, first, second = sides
        source = prefill.call("blocks", 0, P_IDS[0])
        _, params = prefill.call("request_finished", "r", PROMPT, RemoteDecodeRequest(do_remote_decode=True), P_IDS)
        first.call("start_load", "r", PROMPT, params, D_IDS, 0, len(PROMPT) - 1)
        _wait(first, lambda e: "r" in e.finished_recving, what="the first decode's load")
        assert torch.equal(first.call("blocks", 0, D_IDS[0]), source)
        _wait(prefill, lambda e: "r" in e.finished_sending, what="prefill freeing after the read_done")
        prefill.call("fill", 0, P_IDS[0], SENTINEL)  # another prompt reuses the freed blocks
        second.call("start_load", "r", PROMPT, params, D_IDS, 0, len(PROMPT) - 1)
        ev = _wait(second, lambda e: "r" in e.failed_recving or "r" in e.finished_recving, what="the second load")
        assert "r" not in ev.finished_recving, "the second decode loaded blocks another prompt reuses"
        assert f"read by another load of its params (load {load_id('r')} of engine-decode-0)" in ev.failed_recving["r"]
    finally:
        for side in sides:
            side.close()
