"""On CUDA: a load into a block that a forward launched before it still writes ends with the loaded KV, not the
forward's (kv_transfer/decode/compute_order.py; the CPU tests of every load path are in test_load_order.py).

The old request's forward is a long kernel (torch.cuda._sleep) then a write of the block, launched on the compute
stream by this thread, which then marks the stream as start_load does. The load runs on a real loader thread with
that real CUDA event; its transfer is a copy on a stream of its own, as UCX's is (posted with the READ, or, for a
push, when the prefill receives the push request), unordered with the compute stream. Before the fix the copy
landed during the kernel and the forward's write then replaced it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

from pdlaunch.kv_transfer.decode.compute_order import ComputeStream
from pdlaunch.kv_transfer.decode.context import LoadContext, loader_pool
from pdlaunch.kv_transfer.decode.load import Load
from pdlaunch.kv_transfer.decode.loads import DecodeLoads
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.messages import CancelPushAnswer, CancelPushRequest, Empty, PushRequest
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.memory.platform import cuda_event, cuda_stream, event_done
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import handshake_for, make_spec

pytestmark = pytest.mark.gpu

WAIT_S = 60.0
SLEEP_CYCLES = 2**31  # ~1 s of one SM at ~2 GHz: the forward still runs when the load starts
BLOCK = 3  # the decode block the old forward writes and the load fills
OLD, LOADED = 1.0, 2.0


class _SideStreamTransport:
    """The NIXL agent and the prefill's side channel: a READ or a push request copies LOADED into the decode's
    blocks on a stream of its own at once, as UCX would."""

    name = "decode-agent"
    device_id = 0
    release_cancels = True
    release_wait_seconds = 0.0
    release_wait_seconds_per_byte = 0.0

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv
        self.block_bytes = kv[0].numel() * kv.element_size()
        self.stream = cuda_stream(kv.device)
        self.copies: list[torch.cuda.Event] = []

    def _copy(self, first: int, count: int) -> torch.cuda.Event:
        with torch.cuda.stream(self.stream):
            self.kv[first:first + count].fill_(LOADED)
            done = cuda_event()
            done.record(self.stream)
        self.copies.append(done)
        return done

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> Any:
        events = [self._copy((addr - self.kv.data_ptr()) // self.block_bytes, n // self.block_bytes)
                  for addr, n in local]
        return SimpleNamespace(state=lambda: "DONE" if all(event_done(e) for e in events) else "PROC",
                               release=lambda: None, num_bytes=sum(n for _, n in local), error=None)

    def ask(self, message: Any) -> Any:
        if isinstance(message, CancelPushRequest):  # the push load, aborted at the test's end
            return CancelPushAnswer(in_flight=False)
        assert isinstance(message, PushRequest) and message.base_addrs == [self.kv.data_ptr()], message
        for local_start, _, count in message.runs[0]:
            self._copy(local_start, count)  # the prefill's WRITE, once it got the push request
        return Empty()

    def notify(self, remote_agent: str, message: bytes) -> None:
        pass

    def metadata(self) -> bytes:
        return b"decode-metadata"


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_loaded_kv_wins_over_a_forward_launched_before_the_load(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    spec = make_spec(device=str(device))
    kv = spec.kv_caches[0]
    kv.zero_()
    transport = _SideStreamTransport(kv)
    remote = RemoteEngine(handshake_for(spec), "prefill-agent", mode, "test", ("10.0.0.9", 7000))
    executor = loader_pool(device.index or 0, workers=1)
    peers = SimpleNamespace(get=lambda source, stopped=None: remote)
    ctx = LoadContext(agent=cast(Any, transport), spec=lambda: spec, peers=cast(Any, peers), keys=KEYS,
                      handshake_timeout=1.0, transfer_timeout=WAIT_S, verify_kv=False, executor=executor,
                      reader="decode")
    monkeypatch.setattr(ctx, "ask", lambda source, message, reply, timeout, what: transport.ask(message))
    monkeypatch.setattr(ctx, "send_claim_read", lambda load, source: SimpleNamespace(answer=lambda reply: Empty()))
    loads = DecodeLoads(ctx)
    try:
        torch.cuda.synchronize(device)
        # The old request's forward, launched on the compute stream: a long kernel, then its write of the block.
        torch.cuda._sleep(SLEEP_CYCLES)
        kv[BLOCK].fill_(OLD)
        mark = ComputeStream(device).mark()  # start_load of the decode the block went to
        now = time.monotonic()
        load = Load("r-1", RemoteKV(engine_id="P", request_id="p-1", host="10.0.0.9", port=7000, block_ids=[[5]]),
                    [[(0, BLOCK, 5)]], deadline=now + WAIT_S, started=now, compute=mark)
        loads.table.add(load)
        ran: Future[None] = executor.submit(loads.run, load)
        assert mark is not None and not event_done(mark), "the forward ended before the load started: no overlap"
        ran.result(WAIT_S)
        assert load.error is None, load.error
        assert transport.copies, "the load moved nothing"
        for event in transport.copies:
            event.synchronize()
        torch.cuda.synchronize(device)
        assert bool((kv[BLOCK] == LOADED).all()), "the forward launched before the load overwrote the loaded KV"
    finally:
        loads.shutdown()
