"""A staged or resharding READ runs in the loader thread (LoadContext.read_chunk). Mooncake cannot stop a
transfer that runs (MooncakeXfer.release drops only one not started), so a READ the loader gave up
(abort, deadline) still writes into the decode's blocks or staging slots: the load must drain until it
ended, and the loader must not hand its slots back before. That holds from before the READ is posted (an
abort can land while the post runs: LoadContext.post_read)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode import reads
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState, LoadStrategy
from pdlaunch.kv_transfer.decode.pull import PullLoad
from pdlaunch.kv_transfer.decode.table import DRAIN_GRACE_SECONDS, LoadTable
from pdlaunch.kv_transfer.mooncake.sender import MooncakeXfer, TransferPool
from pdlaunch.kv_transfer.remote_kv import RemoteKV

WAIT_S = 30.0


class _Agent:
    """Posts each READ on a real Mooncake transfer pool; the READ runs until `finish` is set."""

    name = "decode-agent"
    device_id = 0
    release_cancels = False  # MooncakeAgent's: a running READ is not stopped by its release

    def __init__(self) -> None:
        self.pool = TransferPool(0, workers=1)
        self.started, self.finish = threading.Event(), threading.Event()
        self.ended_before_return: list[bool] = []
        self.returned = threading.Event()
        self.during_post: Callable[[], None] | None = None  # runs once the READ runs, before the post returns
        self.posted: list[MooncakeXfer] = []

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> MooncakeXfer:
        def run() -> None:
            self.started.set()
            assert self.finish.wait(WAIT_S)
            self.ended_before_return.append(not self.returned.is_set())

        xfer = self.pool.post(run, sum(n for _, n in local), f"{op} with {remote_agent}", wait_on_release=False)
        self.posted.append(xfer)
        if self.during_post is not None:
            assert self.started.wait(WAIT_S)
            self.during_post()
        return xfer


class _Strategy(LoadStrategy):
    mode = "pull"

    def run(self, load: Load) -> None:
        raise AssertionError("not run here")

    def release_prefill(self, load: Load) -> None:
        pass


@pytest.fixture
def agent() -> Iterator[_Agent]:
    agent = _Agent()
    yield agent
    agent.finish.set()
    agent.pool.shutdown()


REMOTE = SimpleNamespace(agent_name="prefill-agent", info=SimpleNamespace(staging_slots=0, base_addrs=[1 << 20],
                                                                          device=SimpleNamespace(index=0)))


def _table(agent: _Agent, strategy: LoadStrategy) -> tuple[LoadTable, Load]:
    spec = SimpleNamespace(kv_caches=[SimpleNamespace(data_ptr=lambda: 1 << 16)], block_bytes=[4096])
    ctx = LoadContext(agent=cast(Any, agent), spec=lambda: cast(Any, spec), peers=cast(Any, None),
                      keys=cast(Any, None), handshake_timeout=1.0, transfer_timeout=WAIT_S, verify_kv=False,
                      executor=cast(Any, None), reader="decode")
    table = LoadTable(ctx)
    now = time.monotonic()
    load = Load("r-1", RemoteKV(engine_id="prefill", request_id="p-1", host="127.0.0.1", port=1, block_ids=[[5]]),
                [[(0, 3, 5)]], deadline=now + WAIT_S, started=now, state=LoadState.RUNNING)
    load.strategy, load.remote_agent = strategy, "prefill-agent"
    table.add(load)
    return table, load


def _freed(table: LoadTable) -> set[str]:
    """Poll the drain until it frees something (the READ ended), at most WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not (safe := table.poll_draining(time.monotonic())[1]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return safe


def test_an_aborted_loader_read_drains_until_it_ended(agent: _Agent) -> None:
    table, load = _table(agent, _Strategy())
    ctx, remote = table.ctx, REMOTE
    errors: list[BaseException] = []

    def loader() -> None:
        try:
            ctx.read_chunk(load, cast(Any, remote), load.remote, [[3]], [1 << 16], [[5]], [4096])
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)
        finally:
            agent.returned.set()

    thread = threading.Thread(target=loader)
    thread.start()
    try:
        assert agent.started.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while load.xfer is None and thread.is_alive() and time.monotonic() < deadline:  # posted, not yet listed
            time.sleep(0.001)
        assert table.abort("r-1") is True, "the decode's blocks were given back while the READ writes them"
        # The loader stops polling the READ (aborted); the slots it READs into go back once it returns.
        agent.returned.wait(2.0)
        assert table.poll_draining(time.monotonic()) == (set(), set())
        agent.finish.set()
        thread.join(WAIT_S)
        assert agent.ended_before_return == [True], "read_chunk returned while its READ still ran"
        assert len(errors) == 1 and isinstance(errors[0], KVTransferError)
        assert _freed(table) == {"r-1"} and load.xfer is None
    finally:
        agent.finish.set()
        thread.join(WAIT_S)


def _in_a_loader_thread(run: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    """`run` started on a thread of its own, as the loader pool runs a load; what it raised is collected."""
    errors: list[BaseException] = []

    def loader() -> None:
        try:
            run()
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)

    thread = threading.Thread(target=loader)
    thread.start()
    return thread, errors


def test_a_loader_read_aborted_while_it_is_posted_drains(agent: _Agent) -> None:
    table, load = _table(agent, _Strategy())
    aborts: list[bool] = []
    agent.during_post = lambda: aborts.append(table.abort("r-1"))  # posted, the post not returned yet
    thread, errors = _in_a_loader_thread(
        lambda: table.ctx.read_chunk(load, cast(Any, REMOTE), load.remote, [[3]], [1 << 16], [[5]], [4096]))
    try:
        _until_aborted(aborts, thread)
        assert aborts == [True], "the decode's blocks were given back while the READ writes them"
        assert table.poll_draining(time.monotonic()) == (set(), set())
        agent.finish.set()
        thread.join(WAIT_S)
        assert len(errors) == 1 and isinstance(errors[0], KVTransferError)
        assert _freed(table) == {"r-1"} and load.xfer is None and not load.read_posting
    finally:
        agent.finish.set()
        thread.join(WAIT_S)


def test_a_pull_read_aborted_while_it_is_posted_drains(agent: _Agent) -> None:
    strategy = PullLoad(cast(Any, None), cast(Any, REMOTE))
    table, load = _table(agent, strategy)
    strategy.ctx = table.ctx
    aborts: list[bool] = []
    agent.during_post = lambda: aborts.append(table.abort("r-1"))
    thread, errors = _in_a_loader_thread(lambda: strategy.run(load))  # the claim it sends next sees the abort
    try:
        _until_aborted(aborts, thread)
        assert aborts == [True], "the decode's blocks were given back while the READ writes them"
        thread.join(WAIT_S)
        assert len(errors) == 1 and isinstance(errors[0], KVTransferError)
        assert table.poll_draining(time.monotonic()) == (set(), set()), "freed while the READ runs"
        agent.finish.set()
        assert _freed(table) == {"r-1"} and load.xfer is None
        assert len(agent.posted) == 1 and agent.posted[0].state() == "DONE"
    finally:
        agent.finish.set()
        thread.join(WAIT_S)


def test_a_read_whose_post_fails_does_not_drain(agent: _Agent) -> None:
    table, load = _table(agent, _Strategy())

    def fail() -> None:
        raise KVTransferError("post refused")

    agent.during_post = fail
    agent.finish.set()
    with pytest.raises(KVTransferError, match="post refused"):
        table.ctx.read_chunk(load, cast(Any, REMOTE), load.remote, [[3]], [1 << 16], [[5]], [4096])
    assert not load.read_posting and load.xfer is None
    assert table.abort("r-1") is False  # nothing posted: the blocks go back now


def _until_aborted(aborts: list[bool], thread: threading.Thread) -> None:
    deadline = time.monotonic() + WAIT_S
    while not aborts and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)


def test_a_read_posted_after_its_drain_ran_out_is_released_by_its_loader(agent: _Agent,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent, "release_cancels", True)  # NIXL: releasing the READ cancels it
    table, load = _table(agent, _Strategy())
    released: list[MooncakeXfer] = []
    monkeypatch.setattr(MooncakeXfer, "release", lambda self: released.append(self))
    freed: list[set[str]] = []

    def abort_and_give_up() -> None:
        assert table.abort("r-1") is True
        freed.append(table.poll_draining(load.deadline + DRAIN_GRACE_SECONDS + 1.0)[1])  # the drain's bound

    agent.during_post = abort_and_give_up
    agent.finish.set()
    with pytest.raises(KVTransferError, match="given up"):
        table.ctx.read_chunk(load, cast(Any, REMOTE), load.remote, [[3]], [1 << 16], [[5]], [4096])
    assert freed == [{"r-1"}]
    assert released == agent.posted and load.xfer is None  # no one else holds the READ: its loader released it


def _drained_past_its_end(table: LoadTable, load: Load) -> set[str]:
    """What poll_draining frees well after the drain's bound (drain_until) ran out."""
    return table.poll_draining(load.drain_until + 60.0)[1]


def test_a_draining_read_that_cannot_be_cancelled_keeps_its_blocks_past_the_drain(
        agent: _Agent, caplog: pytest.LogCaptureFixture) -> None:
    strategy = _ReleaseRecorder()
    table, load = _table(agent, strategy)
    xfer = table.ctx.post_read(load, [(1 << 16, 4096)], [(1 << 20, 4096)], "prefill-agent", 0, b"")
    assert agent.started.wait(WAIT_S)
    assert table.abort("r-1") is True
    with caplog.at_level("WARNING", logger="pdlaunch.kv_transfer.decode.table"):
        assert _drained_past_its_end(table, load) == set(), "blocks freed while the READ still writes them"
        assert _drained_past_its_end(table, load) == set()
    held = [r.getMessage() for r in caplog.records if "stay held until the READ ends" in r.getMessage()]
    assert len(held) == 1 and held[0].startswith("request r-1: its KV READ still runs")  # said once
    assert load.xfer is xfer and strategy.released == []
    agent.finish.set()
    assert _freed(table) == {"r-1"}
    assert xfer.state() == "DONE" and load.xfer is None and strategy.released == ["r-1"]


def test_a_read_that_cannot_be_cancelled_keeps_the_blocks_of_its_timed_out_load(agent: _Agent) -> None:
    table, load = _table(agent, _Strategy())
    table.ctx.post_read(load, [(1 << 16, 4096)], [(1 << 20, 4096)], "prefill-agent", 0, b"")
    assert agent.started.wait(WAIT_S)
    finished, failed = table.poll(load.deadline + 1.0)  # the engine thread fails it at its deadline
    assert finished == set() and "did not arrive" in failed["r-1"]
    assert table.poll_draining(load.deadline + 1.0) == ({"r-1"}, set())
    assert _drained_past_its_end(table, load) == set(), "blocks freed while the READ still writes them"
    agent.finish.set()
    assert _freed(table) == {"r-1"}


def test_a_read_posted_after_its_drain_ran_out_keeps_the_blocks_when_it_cannot_be_cancelled(agent: _Agent) -> None:
    table, load = _table(agent, _Strategy())
    freed: list[set[str]] = []

    def abort_and_poll_past_the_drain() -> None:
        assert table.abort("r-1") is True
        freed.append(_drained_past_its_end(table, load))

    agent.during_post = abort_and_poll_past_the_drain
    xfer = table.ctx.post_read(load, [(1 << 16, 4096)], [(1 << 20, 4096)], "prefill-agent", 0, b"")
    assert freed == [set()], "blocks freed while the READ being posted may write them"
    assert load.xfer is xfer  # listed on the load: the drain sees it run
    assert _drained_past_its_end(table, load) == set()
    agent.finish.set()
    assert _freed(table) == {"r-1"}


def test_a_draining_read_is_cancelled_at_the_drains_end_where_release_cancels_it(agent: _Agent) -> None:
    agent.release_cancels = True  # NIXL: XferHandle.release cancels a running transfer
    table, load = _table(agent, _Strategy())
    xfer = _CancellableXfer()
    load.xfer = xfer
    assert table.abort("r-1") is True
    assert table.poll_draining(load.drain_until - 1.0) == (set(), set())
    assert _drained_past_its_end(table, load) == {"r-1"}
    assert xfer.released and load.xfer is None


def test_a_loader_read_past_its_deadline_holds_its_slots_until_it_ended(agent: _Agent,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reads, "READ_END_WAIT_SECONDS", 0.05)
    table, load = _table(agent, _Strategy())
    load.deadline = time.monotonic() + 0.5
    thread, errors = _in_a_loader_thread(
        lambda: table.ctx.read_chunk(load, cast(Any, REMOTE), load.remote, [[3]], [1 << 16], [[5]], [4096]))
    try:
        assert agent.started.wait(WAIT_S)
        thread.join(2.0)  # well past the deadline and READ_END_WAIT_SECONDS
        assert thread.is_alive(), "read_chunk gave its slots back while its READ still writes them"
        assert load.xfer is not None  # the table's drain sees the READ run
        agent.finish.set()
        thread.join(WAIT_S)
        assert len(errors) == 1 and isinstance(errors[0], KVTransferError)
        assert load.xfer is None
    finally:
        agent.finish.set()
        thread.join(WAIT_S)


class _ReleaseRecorder(_Strategy):
    def __init__(self) -> None:
        self.released: list[str] = []

    def release_prefill(self, load: Load) -> None:
        self.released.append(load.request_id)


class _CancellableXfer:
    """A READ that runs until it is released (which cancels it, as NIXL's release does)."""

    num_bytes = 4096
    error: str | None = None

    def __init__(self) -> None:
        self.released = False

    def state(self) -> str:
        return "ERR" if self.released else "PROC"

    def release(self) -> None:
        self.released = True
