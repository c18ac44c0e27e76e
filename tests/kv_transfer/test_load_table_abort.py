"""LoadTable.abort of a load that already failed but whose failure poll has not reported yet: the
prefill is still told to release its blocks, and the failure is counted (poll never sees it now)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState, LoadStrategy
from pdlaunch.kv_transfer.decode.table import LoadTable
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.metrics.kv_transfer import KV_TRANSFER_FAILURES


class _Strategy(LoadStrategy):
    mode = "pull"

    def __init__(self) -> None:
        self.released: list[str] = []
        self.cancelled_unsent: list[str] = []

    def run(self, load: Load) -> None:
        raise AssertionError("not run here")

    def release_prefill(self, load: Load) -> None:
        self.released.append(load.request_id)

    def cancel_unsent(self, load: Load) -> None:
        self.cancelled_unsent.append(load.request_id)


def _failures() -> float:
    return float(KV_TRANSFER_FAILURES._value.get())


@pytest.fixture
def table() -> LoadTable:
    # NIXL's: a push drain ends DRAIN_GRACE_SECONDS after the deadline, releasing a READ cancels it
    agent = SimpleNamespace(release_wait_seconds=0.0, release_wait_seconds_per_byte=0.0, release_cancels=True)
    ctx = LoadContext(agent=cast(Any, agent), spec=cast(Any, None), peers=cast(Any, None), keys=cast(Any, None),
                      handshake_timeout=1.0, transfer_timeout=30.0, verify_kv=False,
                      executor=cast(ThreadPoolExecutor, None), reader="decode")
    return LoadTable(ctx)


def _load(table: LoadTable, state: LoadState) -> tuple[Load, _Strategy]:
    now = time.monotonic()
    load = Load("r-1", RemoteKV(engine_id="prefill", request_id="p-1", host="127.0.0.1", port=1, block_ids=[[1]]),
                [[(0, 3, 1)]], deadline=now + 30.0, started=now, state=LoadState.RUNNING)
    strategy = _Strategy()
    load.strategy, load.remote_agent = strategy, "prefill-agent"
    table.add(load)
    if state == LoadState.FAILED:
        load.fail("NIXL READ of 4096 bytes failed")  # the loader thread failed it; poll has not run since
    return load, strategy


def test_abort_of_a_failed_unreported_load_releases_the_prefill_and_counts_it(table: LoadTable) -> None:
    load, strategy = _load(table, LoadState.FAILED)
    before = _failures()
    assert table.abort(load.request_id) is False
    assert strategy.released == ["r-1"]
    assert strategy.cancelled_unsent == ["r-1"]
    assert _failures() == before + 1
    assert table.request_ids() == set()
    assert table.poll(time.monotonic()) == (set(), {})  # reported once: not again by poll


def test_abort_of_a_running_load_releases_the_prefill_without_counting_a_failure(table: LoadTable) -> None:
    load, strategy = _load(table, LoadState.RUNNING)
    before = _failures()
    assert table.abort(load.request_id) is False
    assert strategy.released == ["r-1"]
    assert _failures() == before
    assert table.request_ids() == set()


def test_abort_of_a_running_load_before_its_push_was_sent_lets_the_prefill_free_at_once(table: LoadTable) -> None:
    """A client that leaves while its push load is being set up (handshake done, push request not sent yet): the
    prefill holds the request's blocks for its push until told otherwise, so it is told (cancel_unsent: a
    cancel_push), as a load that fails there tells it; it used to keep them until its lease ended."""
    load, strategy = _load(table, LoadState.RUNNING)
    assert not load.push_sent
    assert table.abort(load.request_id) is False
    assert strategy.cancelled_unsent == ["r-1"]
    assert table.request_ids() == set()


def test_abort_of_a_failed_unreported_load_that_drains_counts_it_once(table: LoadTable) -> None:
    load, strategy = _load(table, LoadState.FAILED)
    load.push_sent = True  # a WRITE may still land: the blocks drain, the prefill is told when it ends
    table.ctx.executor = cast(ThreadPoolExecutor, _NoExecutor())
    before = _failures()
    assert table.abort(load.request_id) is True
    assert strategy.released == []
    assert _failures() == before + 1
    load.write_ended = True
    assert table.poll_draining(time.monotonic()) == (set(), {"r-1"})
    assert strategy.released == ["r-1"]
    assert _failures() == before + 1


class _NoExecutor:
    def submit(self, fn: Any, *args: Any) -> None:  # the cancel_push call to the prefill is not under test
        pass


def test_a_read_the_table_and_its_loader_both_give_up_is_released_once(table: LoadTable) -> None:
    """The table (an abort) and the loader thread (_end_read) each release a load's READ when they are done
    with it; whichever takes it from the load releases it. Here the loader's release runs while the table's
    is in progress, the interleaving of two threads: the READ is still released once (twice: a NIXL handle
    freed twice)."""
    load, _ = _load(table, LoadState.RUNNING)
    releases: list[str] = []

    class _Xfer:
        num_bytes = 4096

        def state(self) -> str:
            return "DONE"

        def release(self) -> None:
            releases.append("release")
            if len(releases) == 1:  # the loader thread reaches its own release meanwhile
                table.ctx._end_read(load, cast(Any, self))  # noqa: SLF001

    load.xfer = cast(Any, _Xfer())
    table._release(load)  # noqa: SLF001
    assert releases == ["release"] and load.xfer is None
