"""A decode load that ends while it shakes hands with the prefill (its client left, /abort, its deadline passed),
before its strategy (pull/push) was chosen, tells the prefill to drop the request's hold: the prefill frees the
blocks at its next poll, not at its lease's end (60 s by default). The table's abort and poll could not tell it
(no strategy yet) and the loader thread returned without a word once the handshake ended. Exactly one of the two
tells it: an abort that lands after the strategy was chosen goes the table's way (test_load_table_abort.py), and
the prefill hears of the load once, whichever way."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load
from pdlaunch.kv_transfer.decode.loads import DecodeLoads
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.messages import CancelPushAnswer, CancelPushRequest
from pdlaunch.kv_transfer.notifications import ReadDone, parse_notification
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import handshake_for, make_spec

SPEC = make_spec()
LEASE_S = 60.0
WAIT_S = 30.0  # generous: a loaded 2-core machine


@dataclass
class _Prefill:
    """The prefill's hold table behind its side channel; counts what reached it about the hold."""

    holds: HoldTable
    cancels: list[str] = field(default_factory=list)  # cancel_push owners
    notes: list[ReadDone] = field(default_factory=list)  # release/read_done notifications
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel_push(self, message: CancelPushRequest) -> CancelPushAnswer:
        with self.lock:
            self.cancels.append(message.owner)
        return self.holds.cancel_push(message)

    def heard(self) -> int:
        with self.lock:
            return len(self.cancels) + len(self.notes)

    def freed(self) -> bool:
        """Poll the table as the prefill's engine thread does until it frees p-1 (False after WAIT_S)."""
        until = time.monotonic() + WAIT_S
        while time.monotonic() < until:
            if "p-1" in self.holds.poll(time.monotonic()):
                return True
            time.sleep(0.01)
        return False


class _Agent:
    """The decode's agent: a notification to the prefill reaches its hold table at once."""

    name = "decode-agent"
    device_id = 0
    release_cancels = True
    release_wait_seconds = 0.0
    release_wait_seconds_per_byte = 0.0

    def __init__(self, prefill: _Prefill) -> None:
        self.prefill = prefill

    def notify(self, remote_agent: str, message: bytes) -> None:
        notif = parse_notification(message)
        assert isinstance(notif, ReadDone)
        with self.prefill.lock:
            self.prefill.notes.append(notif)
        self.prefill.holds.on_read_done(notif)


class _Peers:
    """A handshake that runs until the test lets it answer."""

    def __init__(self, mode: str, port: int) -> None:
        self.mode, self.port = mode, port
        self.entered, self.answer = threading.Event(), threading.Event()

    def get(self, remote: RemoteKV, stopped: Callable[[], bool] | None = None) -> RemoteEngine:
        self.entered.set()
        assert self.answer.wait(WAIT_S), "the test never let the handshake answer"
        return RemoteEngine(handshake_for(SPEC), "prefill-agent", self.mode, "test", ("127.0.0.1", self.port))


@dataclass
class _Decode:
    loads: DecodeLoads
    peers: _Peers
    executor: ThreadPoolExecutor
    prefill: _Prefill

    def start(self, prefill_block: int = 3) -> tuple[Load, Future[None]]:
        """Load r-1 (prefill request p-1) on a loader thread, which waits in its handshake."""
        now = time.monotonic()
        remote = RemoteKV(engine_id="P", request_id="p-1", host="127.0.0.1", port=self.peers.port,
                          block_ids=[[3, 4]])
        load = Load("r-1", remote, [[(0, 10, prefill_block), (1, 11, 4)]], deadline=now + WAIT_S, started=now)
        self.loads.table.add(load)
        future = self.executor.submit(self.loads.run, load)
        assert self.peers.entered.wait(WAIT_S)
        return load, future

    def end_handshake(self, future: Future[None]) -> None:
        self.peers.answer.set()
        future.result(timeout=WAIT_S)


@pytest.fixture(params=["pull", "push"])
def decode(request: pytest.FixtureRequest) -> Iterator[_Decode]:
    holds = HoldTable(lease_seconds=LEASE_S)
    holds.hold("p-1", [[3, 4]])
    prefill = _Prefill(holds)
    server = SideChannelServer("127.0.0.1", 0, {"cancel_push": prefill.cancel_push}, KEYS)
    executor = ThreadPoolExecutor(max_workers=2)
    peers = _Peers(request.param, server.port)
    ctx = LoadContext(agent=cast(Any, _Agent(prefill)), spec=lambda: SPEC, peers=cast(Any, peers), keys=KEYS,
                      handshake_timeout=WAIT_S, transfer_timeout=WAIT_S, verify_kv=False, executor=executor,
                      reader="decode")
    loads = DecodeLoads(ctx)
    try:
        yield _Decode(loads, peers, executor, prefill)
    finally:
        peers.answer.set()
        executor.shutdown(wait=True)
        ctx.connections.close()
        server.shutdown()
        server.server_close()


def test_an_abort_during_the_handshake_lets_the_prefill_free_at_once(decode: _Decode) -> None:
    load, future = decode.start()
    assert decode.loads.table.abort("r-1") is False  # nothing was sent: nothing drains
    decode.end_handshake(future)
    assert decode.prefill.freed()
    assert len(decode.prefill.holds) == 0
    decode.executor.shutdown(wait=True)
    assert decode.prefill.cancels == [load.nonce]  # told once
    assert decode.loads.table.request_ids() == set()


def test_a_load_timed_out_during_the_handshake_lets_the_prefill_free_at_once(decode: _Decode) -> None:
    load, future = decode.start()
    finished, failed = decode.loads.table.poll(load.deadline + 1.0)  # the engine thread gives up on it
    assert not finished and "stage: handshake" in failed["r-1"]
    decode.end_handshake(future)
    assert decode.prefill.freed()
    decode.executor.shutdown(wait=True)
    assert decode.prefill.cancels == [load.nonce]


def test_a_load_whose_prefill_answer_fails_its_checks_lets_the_prefill_free_at_once(decode: _Decode) -> None:
    load, future = decode.start(prefill_block=SPEC.num_blocks)  # past the prefill's cache: check_block_ids fails
    decode.end_handshake(future)
    finished, failed = decode.loads.table.poll(time.monotonic())
    assert not finished and "handshake announced" in failed["r-1"]
    assert decode.prefill.freed()
    decode.executor.shutdown(wait=True)
    assert decode.prefill.cancels == [load.nonce]


def test_an_abort_after_the_strategy_was_chosen_is_told_to_the_prefill_once(decode: _Decode) -> None:
    """The abort lands between the loader's choice of strategy and its start (where a test fault may fail it):
    the table tells the prefill (pull: a release notification, push: a cancel_push), the loader does not."""
    aborted: list[bool] = []
    decode.loads.faults.maybe_fail = lambda request_id: aborted.append(decode.loads.table.abort(request_id))  # type: ignore[method-assign]
    _, future = decode.start()
    decode.end_handshake(future)
    assert aborted == [False]
    assert decode.prefill.freed()
    decode.executor.shutdown(wait=True)  # a cancel the abort handed to a loader thread was sent by now
    assert decode.prefill.heard() == 1
