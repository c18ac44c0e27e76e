"""A decode's load writes nothing into its blocks before the forwards launched before it ended
(kv_transfer/decode/compute_order.py).

The engine can free a request's blocks while a forward it launched still writes them (async scheduling, a step
that samples nothing; an abort, a stop seen a step late, a preemption), and give them to the next PD decode at
once. Its load was posted from a loader thread with no ordering against the compute stream: a READ (pull), the
push request (the prefill WRITEs after it), a staged chunk's scatter, a resharding copy could land before the old
forward's last write to a slot, which then overwrote the loaded KV for the later layers. Now start_load marks the
compute stream and the loader waits for the mark before the first write into the blocks.

Here the mark is a fake CUDA event that reports "not done" for its first queries: every load path (pull, push,
staged pull and push through this side's slots or straight into the blocks, resharding) is driven through the
loader (DecodeLoads.run) with a fake transport, and each write is recorded with whether the mark was done then.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.decode import compute_order, reshard_load
from pdlaunch.kv_transfer.decode.compute_order import COMPUTE_STAGE, ComputeStream
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load
from pdlaunch.kv_transfer.decode.loads import DecodeLoads
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.handshake import DeviceInfo, HandshakeInfo, compat_fields, compat_hash
from pdlaunch.kv_transfer.messages import (
    CancelPushAnswer,
    CancelPushRequest,
    Empty,
    PushRequest,
    StageAnswer,
    StageRequest,
    UnstageRequest,
)
from pdlaunch.kv_transfer.notifications import PushDone
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.reshard import plan_reshard
from pdlaunch.kv_transfer.staging import StagingArea
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import handshake_for, make_spec

WAIT_S = 30.0  # a load's transfer timeout where it must complete: never reached
SHORT_S = 0.4  # a load's transfer timeout where its mark never completes
BUSY_QUERIES = 5  # the fake mark answers "not done" this many times
PAIRS = [[(0, 1, 5), (1, 2, 6), (2, 3, 7)]]  # (block-table index, decode block, prefill block)


class _Mark:
    """A compute-stream mark (what a CUDA event's query() says): not done for its first `busy` queries, then
    done; busy None: never done (a device that never finishes the forward)."""

    def __init__(self, busy: int | None) -> None:
        self.busy = busy
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.done

    @property
    def done(self) -> bool:
        return self.busy is not None and self.queries > self.busy


@dataclass
class _Write:
    what: str  # READ | push | scatter | head copy
    into_blocks: bool  # lands in the decode's KV blocks (else in staging slots)
    mark_done: bool  # the mark was done when it was posted


@dataclass
class _Case:
    local_staging: bool  # this side copies through its staging slots
    remote_staging: int  # the prefill's staging slots (0: its blocks are READ or WRITten directly)
    mode: str  # pull | push
    reshard: bool = False  # prefill TP 2, decode TP 1


CASES = {
    "pull": _Case(False, 0, "pull"),
    "push": _Case(False, 0, "push"),
    "staged pull into slots": _Case(True, 0, "pull"),
    "staged pull into blocks": _Case(False, 2, "pull"),
    "staged push into slots": _Case(True, 0, "push"),
    "staged push into blocks": _Case(False, 2, "push"),
    "reshard": _Case(False, 0, "pull", reshard=True),
}


@dataclass
class _Harness:
    """The decode side's loader with a fake transport: each write is recorded with the mark's state."""

    case: _Case
    spec: KVCacheSpec
    mark: _Mark
    writes: list[_Write] = field(default_factory=list)
    # the agent's interface (TransferAgent)
    name: str = "decode-agent"
    device_id: int = 0
    release_cancels: bool = True
    release_wait_seconds: float = 0.0
    release_wait_seconds_per_byte: float = 0.0

    def into_blocks(self, addr: int) -> bool:
        return any(t.data_ptr() <= addr < t.data_ptr() + t.numel() * t.element_size() for t in self.spec.kv_caches)

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> Any:
        self.writes.append(_Write(op, self.into_blocks(local[0][0]), self.mark.done))
        return SimpleNamespace(state=lambda: "DONE", release=lambda: None, num_bytes=sum(n for _, n in local),
                               error=None)

    def notify(self, remote_agent: str, message: bytes) -> None:
        pass

    def metadata(self) -> bytes:
        return b"decode-metadata"

    def register_extra(self, buffers: list[torch.Tensor]) -> None:
        pass

    # the prefill's side channel (LoadContext.ask)
    def ask(self, ctx: LoadContext, message: Any) -> Any:
        if isinstance(message, PushRequest):
            self.writes.append(_Write("push", self.into_blocks(message.base_addrs[0]), self.mark.done))
            ctx.chunks.on_notif(PushDone(kind="push_done", nonce=message.nonce))  # a staged chunk's WRITE landed
            return Empty()
        if isinstance(message, StageRequest):
            return StageAnswer(ticket="0" * 16, slots=[list(range(len(ids))) for ids in message.blocks])
        if isinstance(message, CancelPushRequest):
            return CancelPushAnswer(in_flight=False)
        assert isinstance(message, UnstageRequest), message
        return Empty()

    # the prefill ranks' handshakes (PeerCache.get)
    def get(self, remote: RemoteKV, stopped: Callable[[], bool] | None = None) -> RemoteEngine:
        if not self.case.reshard:
            info = handshake_for(self.spec, staging_slots=self.case.remote_staging)
            return RemoteEngine(info, "prefill-agent", self.case.mode, "test", ("10.0.0.9", 7000))
        rank = remote.tp_rank
        assert rank is not None
        fields = compat_fields(self.spec)
        info = HandshakeInfo(
            engine_id="P", agent_name=f"prefill-agent-{rank}", agent_metadata="00", base_addrs=[1 << 20],
            block_bytes=[b // 2 for b in self.spec.block_bytes], num_blocks=self.spec.num_blocks,
            block_size=self.spec.block_size, dtype=fields["dtype"], kv_layout=fields["kv_layout"], num_kv_heads=1,
            head_dim=self.spec.head_dim, group_layers=self.spec.group_layers, model_name=self.spec.model_name,
            tp_size=2, tp_rank=rank, device=DeviceInfo(type="cpu"), compat_hash=compat_hash(fields))
        return RemoteEngine(info, f"prefill-agent-{rank}", "pull", "test", ("10.0.0.9", 7000 + rank))


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1)
    yield executor
    executor.shutdown(wait=True)


def _loads(case: _Case, mark: _Mark, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch,
           timeout: float = WAIT_S) -> tuple[DecodeLoads, Load, _Harness]:
    """A decode side's loads whose transport is the harness, and a load into decode blocks 1-3 marked `mark`."""
    spec = make_spec()  # 2 KV heads: a resharding decode of TP 1 reads one head from each of 2 prefill ranks
    harness = _Harness(case, spec, mark)
    ctx = LoadContext(agent=cast(Any, harness), spec=lambda: spec, peers=cast(Any, harness), keys=KEYS,
                      handshake_timeout=1.0, transfer_timeout=timeout, verify_kv=False, executor=executor,
                      reader="decode")
    if case.local_staging:
        ctx.staging = StagingArea(spec.kv_caches, 2 * sum(spec.block_bytes))  # 2 slots: the load takes 2 chunks
        real_scatter = ctx.staging.scatter

        def scatter(kv_caches: list[torch.Tensor], blocks: list[list[int]], slots: list[int]) -> None:
            harness.writes.append(_Write("scatter", True, mark.done))
            real_scatter(kv_caches, blocks, slots)

        monkeypatch.setattr(ctx.staging, "scatter", scatter)
    monkeypatch.setattr(ctx, "ask", lambda remote, message, reply, timeout, what: harness.ask(ctx, message))
    claim = SimpleNamespace(answer=lambda reply: Empty())  # the prefill holds the blocks for our READ
    monkeypatch.setattr(ctx, "send_claim_read", lambda load, remote: claim)
    real_copy = reshard_load.copy_head_slices

    def copy_head_slices(kv_caches: list[torch.Tensor], *args: Any) -> None:
        harness.writes.append(_Write("head copy", True, mark.done))
        real_copy(kv_caches, *args)

    monkeypatch.setattr(reshard_load, "copy_head_slices", copy_head_slices)
    remote = RemoteKV(engine_id="P", request_id="p-1", host="10.0.0.9", port=7000, block_ids=[[5, 6, 7]],
                      **({"tp_size": 2, "kv_heads_per_rank": 1, "rank_ports": [7000, 7001]} if case.reshard else {}))
    now = time.monotonic()
    load = Load("r-1", remote, [list(g) for g in PAIRS], deadline=now + timeout, started=now,
                compute=cast(Any, mark))
    if case.reshard:
        load.reshard = plan_reshard(remote, spec.tp_rank, spec.tp_size, spec.num_kv_heads)
    loads = DecodeLoads(ctx)
    loads.table.add(load)
    return loads, load, harness


@pytest.mark.parametrize("name", list(CASES))
def test_no_load_path_writes_the_blocks_before_the_compute_mark_completed(
        name: str, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    mark = _Mark(busy=BUSY_QUERIES)
    loads, load, harness = _loads(case, mark, executor, monkeypatch)
    loads.run(load)
    assert load.error is None, load.error
    into_blocks = [w for w in harness.writes if w.into_blocks]
    assert into_blocks, f"{name}: nothing wrote the blocks ({harness.writes})"
    early = [w for w in into_blocks if not w.mark_done]
    assert not early, f"{name}: posted into the blocks while a forward launched before the load may write them: {early}"
    assert mark.queries > BUSY_QUERIES, "the loader never waited for the mark"
    if case.local_staging or case.reshard:
        # Into this side's slots, the first chunk moves while the forwards run: the wait is as late as it can be.
        assert not harness.writes[0].into_blocks and not harness.writes[0].mark_done, harness.writes


@pytest.mark.parametrize("name", list(CASES))
def test_a_load_whose_mark_never_completes_fails_at_its_deadline_and_frees_its_blocks(
        name: str, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that never finishes the forward: the load fails at its deadline naming what it waited for, nothing
    was written into its blocks, and the engine gets them back at once (no drain), as any failed load's."""
    loads, load, harness = _loads(CASES[name], _Mark(busy=None), executor, monkeypatch, timeout=SHORT_S)
    started = time.monotonic()
    loads.run(load)
    assert time.monotonic() - started >= SHORT_S * 0.9
    assert not [w for w in harness.writes if w.into_blocks], harness.writes
    finished, failed = loads.table.poll(time.monotonic())
    assert not finished and set(failed) == {"r-1"}
    assert f"did not arrive within {SHORT_S:g}s" in failed["r-1"] and COMPUTE_STAGE in failed["r-1"], failed
    assert loads.table.poll_draining(time.monotonic()) == (set(), set()), "the failed load's blocks drain"
    assert loads.table.request_ids() == set()


def test_an_aborted_load_stops_waiting_for_its_mark(executor: ThreadPoolExecutor,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An abort while the loader waits for the mark ends the wait: the load writes nothing, and its blocks go back
    at once (nothing may write them, so no drain)."""
    mark = _Mark(busy=None)
    loads, load, harness = _loads(CASES["pull"], mark, executor, monkeypatch)
    ran = executor.submit(loads.run, load)
    deadline = time.monotonic() + WAIT_S / 2
    while mark.queries == 0 and time.monotonic() < deadline:  # the loader reached the wait
        time.sleep(0.001)
    assert mark.queries > 0 and not ran.done(), "the loader did not wait for the mark"
    assert loads.table.abort("r-1") is False, "an aborted load that wrote nothing drains"
    ran.result(WAIT_S / 2)
    assert harness.writes == [] and load.error == "aborted"


def test_the_mark_is_an_event_recorded_on_the_devices_current_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """ComputeStream.mark records on the stream the forwards run on: the current stream of the KV cache's device
    in the calling thread (the engine thread), as offload/transfer.py does; on CPU there is none."""
    recorded: list[tuple[object, str]] = []

    class _Event:
        def record(self, stream: object) -> None:
            recorded.append((self, str(stream)))

    monkeypatch.setattr(compute_order, "cuda_event", _Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"compute stream of {device}")
    event = ComputeStream(torch.device("cuda", 1)).mark()
    assert recorded == [(event, "compute stream of cuda:1")]
    assert ComputeStream(torch.device("cpu")).mark() is None and len(recorded) == 1
