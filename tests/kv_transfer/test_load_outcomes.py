"""A decode rank of a TP group (LoadTable.reports_outcomes) counts no KV transfer series itself: it reports how each
of its loads ended (once: done with its bytes and times, failed, or aborted) in its events, for rank 0 to count the
group's (distributed/tp_connector.py); its own process's series are never served. A decode of TP 1 counts them
where the load ends, as before."""

from __future__ import annotations

import time

import pytest

from pdlaunch.kv_transfer.base import LoadOutcome
from pdlaunch.kv_transfer.decode.load import LoadState
from pdlaunch.kv_transfer.decode.table import LoadTable
from pdlaunch.metrics.kv_transfer import KV_TRANSFER_BYTES, KV_TRANSFER_FAILURES
from tests.kv_transfer.test_load_table_abort import _load, table  # noqa: F401 - the fixture

BLOCK_BYTES = 4096


def _counted() -> tuple[float, float]:
    return KV_TRANSFER_BYTES._value.get(), KV_TRANSFER_FAILURES._value.get()


def test_a_tp_ranks_load_reports_its_end_once_and_counts_nothing(table: LoadTable) -> None:  # noqa: F811
    table.reports_outcomes = True
    before = _counted()
    load, _ = _load(table, LoadState.RUNNING)
    load.num_bytes = BLOCK_BYTES
    now = time.monotonic()
    load.started, load.posted = now - 2.0, now - 0.5  # a slow handshake, then the READ
    load.state = LoadState.OK
    assert table.poll(now) == ({"r-1"}, {})
    outcome = table.take_outcomes()["r-1"]
    assert (outcome.end, outcome.num_bytes) == ("done", BLOCK_BYTES)
    assert (outcome.load_seconds, outcome.xfer_seconds) == (pytest.approx(2.0), pytest.approx(0.5))
    assert table.take_outcomes() == {}  # once

    _load(table, LoadState.FAILED)
    assert "r-1" in table.poll(time.monotonic())[1]
    assert table.take_outcomes() == {"r-1": LoadOutcome("failed")}

    _load(table, LoadState.RUNNING)
    assert table.abort("r-1") is False
    assert table.take_outcomes() == {"r-1": LoadOutcome("aborted")}
    assert table.abort("r-1") is False  # no load any more: nothing more reported
    assert table.take_outcomes() == {}
    assert _counted() == before


def test_a_tp1_decode_counts_its_loads_itself(table: LoadTable) -> None:  # noqa: F811
    before = _counted()
    load, _ = _load(table, LoadState.RUNNING)
    load.num_bytes, load.state = BLOCK_BYTES, LoadState.OK
    table.poll(time.monotonic())
    _load(table, LoadState.FAILED)
    table.poll(time.monotonic())
    assert table.take_outcomes() == {}
    assert _counted() == (before[0] + BLOCK_BYTES, before[1] + 1)
