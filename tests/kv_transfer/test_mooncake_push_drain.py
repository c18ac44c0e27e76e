"""A push over Mooncake that decode gave up on (abort, timeout): Mooncake cannot cancel the prefill's
running WRITE, so the prefill waits for it up to RELEASE_WAIT_SECONDS past decode's deadline before it
says push_failed. Decode's blocks drain until that word (or that bound plus the grace), not just the
grace after the deadline that suffices where the WRITE is cancelled at the deadline (NIXL).

Mooncake's timeout for a transfer grows with its bytes (MC_TRANSFER_TIMEOUT plus a second per GB), and so do
the prefill's wait for a released WRITE and the decode's drain: a 20 GB push (a ~128k-token prompt of an 8B
model on one rank) may still land 20 s after a fixed MC_TRANSFER_TIMEOUT-based bound."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.kv_transfer.agent import KVAgent
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState, LoadStrategy
from pdlaunch.kv_transfer.decode.table import DRAIN_GRACE_SECONDS, LoadTable
from pdlaunch.kv_transfer.mooncake import sender
from pdlaunch.kv_transfer.mooncake.agent import MooncakeAgent
from pdlaunch.kv_transfer.mooncake.sender import RELEASE_WAIT_SECONDS, MooncakeXfer, TransferPool
from pdlaunch.kv_transfer.notifications import PushFailed
from pdlaunch.kv_transfer.remote_kv import RemoteKV

GB = 10**9


class _Strategy(LoadStrategy):
    mode = "push"

    def __init__(self) -> None:
        self.released: list[str] = []

    def run(self, load: Load) -> None:
        raise AssertionError("not run here")

    def release_prefill(self, load: Load) -> None:
        self.released.append(load.request_id)


class _NoExecutor:
    def submit(self, fn: Any, *args: Any) -> None:  # the cancel_push call to the prefill is not under test
        pass


@pytest.fixture
def mooncake_agent() -> Iterator[MooncakeAgent]:
    pool = TransferPool(0, workers=1)
    agent = MooncakeAgent("decode-agent", cast(Any, None), pool, "secret")  # no transfer runs here
    yield agent
    agent._notifier.shutdown()
    pool.shutdown()


def _aborted_push(agent: Any, num_bytes: int = 0) -> tuple[LoadTable, Load, _Strategy]:
    ctx = LoadContext(agent=agent, spec=cast(Any, None), peers=cast(Any, None), keys=cast(Any, None),
                      handshake_timeout=1.0, transfer_timeout=30.0, verify_kv=False,
                      executor=cast(Any, _NoExecutor()), reader="decode")
    table = LoadTable(ctx)
    now = time.monotonic()
    load = Load("r-1", RemoteKV(engine_id="prefill", request_id="p-1", host="127.0.0.1", port=1, block_ids=[[1]]),
                [[(0, 3, 1)]], deadline=now + 30.0, started=now, state=LoadState.RUNNING)
    strategy = _Strategy()
    load.strategy, load.remote_agent, load.push_sent = strategy, "prefill-agent", True
    load.num_bytes = num_bytes
    table.add(load)
    assert table.abort("r-1") is True  # the prefill may WRITE into the blocks: they drain
    return table, load, strategy


def test_a_mooncake_push_drains_until_the_prefill_says_its_write_ended(mooncake_agent: MooncakeAgent) -> None:
    table, load, strategy = _aborted_push(mooncake_agent)
    # The prefill's WRITE may still run here (its release waits up to RELEASE_WAIT_SECONDS).
    late = load.deadline + DRAIN_GRACE_SECONDS + 1.0
    assert table.poll_draining(late) == (set(), set()), "blocks freed while the prefill's WRITE may still land"
    assert table.poll_draining(load.deadline + RELEASE_WAIT_SECONDS) == (set(), set())
    assert strategy.released == []
    table.on_push_notif(PushFailed(kind="push_failed", nonce=load.nonce, error="WRITE did not finish"))
    assert table.poll_draining(late) == (set(), {"r-1"})
    assert strategy.released == ["r-1"]
    assert table.request_ids() == set()


def test_a_mooncake_push_drain_ends_after_the_senders_wait(mooncake_agent: MooncakeAgent) -> None:
    table, load, strategy = _aborted_push(mooncake_agent)
    end = load.deadline + RELEASE_WAIT_SECONDS + DRAIN_GRACE_SECONDS
    assert table.poll_draining(end) == (set(), set())
    assert table.poll_draining(end + 0.5) == (set(), {"r-1"})  # no word from the prefill: freed anyway
    assert strategy.released == ["r-1"]
    assert table.request_ids() == set()


def test_a_large_mooncake_push_drains_a_second_per_gb_longer(mooncake_agent: MooncakeAgent) -> None:
    table, load, strategy = _aborted_push(mooncake_agent, num_bytes=20 * GB)
    end = load.deadline + RELEASE_WAIT_SECONDS + DRAIN_GRACE_SECONDS
    assert table.poll_draining(end + 19.5) == (set(), set()), "blocks freed while Mooncake may still run the WRITE"
    assert table.poll_draining(end + 20.5) == (set(), {"r-1"})
    assert strategy.released == ["r-1"]


class _Clock:
    """time.monotonic and time.sleep for sender.py: a sleep advances the clock at once."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.25)


def test_a_released_large_write_is_waited_for_a_second_per_gb_longer(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(sender, "time", clock)
    write = MooncakeXfer(cast(Any, SimpleNamespace(cancel=lambda: False, done=lambda: False)), 20 * GB,
                         "WRITE with decode-agent", wait_on_release=True)  # runs on: Mooncake cannot cancel it
    write.release()
    assert RELEASE_WAIT_SECONDS + 20.0 <= clock.now < RELEASE_WAIT_SECONDS + 21.0


def test_a_nixl_push_drain_ends_at_the_grace_after_the_deadline() -> None:
    agent = SimpleNamespace(release_wait_seconds=KVAgent.release_wait_seconds,  # NIXL cancels at the deadline
                            release_wait_seconds_per_byte=KVAgent.release_wait_seconds_per_byte,
                            release_cancels=KVAgent.release_cancels)
    table, load, strategy = _aborted_push(agent, num_bytes=20 * GB)
    assert table.poll_draining(load.deadline + DRAIN_GRACE_SECONDS) == (set(), set())
    assert table.poll_draining(load.deadline + DRAIN_GRACE_SECONDS + 0.5) == (set(), {"r-1"})
    assert strategy.released == ["r-1"]
