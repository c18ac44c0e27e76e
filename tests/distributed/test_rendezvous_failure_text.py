"""A TP rank that cannot join its group, or reach rank 0's store, says what happened (distributed/
rendezvous_failure.py). A join that failed at once, because rank 0's store went away and its port closed ("Broken
pipe" as the rank read it), said the peers had not come "within 60s", though no time had passed; a store client that
found no store raised torch's raw DistNetworkError, not our error. Now a failure that came sooner names the store
at host:port and the reason, and a wait that ran out says how long it waited and for what. Real TCPStores on
localhost, gloo; no GPU."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from pdlaunch.distributed import parallel_state
from pdlaunch.distributed.join_waits import OPEN_KEY
from pdlaunch.distributed.parallel_state import (
    SealedStore,
    connect_store,
    create_store,
    destroy_tp_group,
    fresh_store_key,
    init_tp_group,
)
from pdlaunch.distributed.rendezvous_failure import store_unreached
from pdlaunch.errors import EngineError

HOST = "127.0.0.1"
TIMEOUT_S = 2.0  # the join's and the store client's timeouts, cut from 60 s and 120 s
SLACK_S = 20.0  # a loaded 2-core machine's lateness (torch retries a refused connect with backoff)
DROPPED = ("Broken pipe", "Connection reset by peer")  # how a read of a store whose port closed fails


def _closed_port() -> int:
    probe = socket.socket()
    probe.bind((HOST, 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


@pytest.mark.timeout(120)
def test_a_join_whose_store_went_away_says_so_at_once_not_the_timeout() -> None:
    masters = [create_store(HOST, None, 2)]
    port = masters[0].port
    key = fresh_store_key()
    SealedStore(masters[0], key).set(OPEN_KEY, "1")

    class GoneAfterOpen(SealedStore):
        """Rank 1's store: once rank 1 saw rank 0 open the group, rank 0 exits and its store (and port) close."""

        def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:  # type: ignore[override]
            super().wait(keys) if timeout is None else super().wait(keys, timeout)
            masters.clear()  # the last reference: the store's server stops and its port closes

    store = GoneAfterOpen(connect_store(HOST, port, key).inner, key)
    start = time.monotonic()
    with pytest.raises(EngineError) as failed:
        init_tp_group(1, 2, torch.device("cpu"), HOST, port, store, TIMEOUT_S)
    took = time.monotonic() - start
    text = failed.value.message
    assert took < parallel_state.COLLECTIVE_TIMEOUT_S / 2, f"the join took {took:.1f}s"
    assert text.startswith(f"TP rank 1 could not join the 2-rank group: rank 0's rendezvous store at {HOST}:{port} "
                           "failed after "), text
    assert f"s, before its {parallel_state.COLLECTIVE_TIMEOUT_S:.0f}s wait ran out: " in text, text
    assert any(text.endswith(reason) for reason in DROPPED), text
    assert "within" not in text, text
    assert "may have exited" in (failed.value.hint or "")
    assert not dist.is_initialized()


@pytest.mark.timeout(120)
def test_a_join_whose_peer_never_comes_says_how_long_it_waited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel_state, "COLLECTIVE_TIMEOUT_S", TIMEOUT_S)
    store = create_store(HOST, None, 2)
    start = time.monotonic()
    try:
        with pytest.raises(EngineError) as failed:
            init_tp_group(0, 2, torch.device("cpu"), HOST, store.port, SealedStore(store, fresh_store_key()))
    finally:
        destroy_tp_group()
    took = time.monotonic() - start
    assert TIMEOUT_S <= took < TIMEOUT_S + SLACK_S, f"the join took {took:.1f}s"
    text = failed.value.message
    assert text.startswith(f"TP rank 0 could not join the 2-rank group at {HOST}:{store.port} within "
                           f"{TIMEOUT_S:.0f}s: "), text
    assert "wait ran out" not in text, text
    assert "another rank failed to start" in (failed.value.hint or "")


@pytest.mark.timeout(120)
def test_a_store_client_at_a_closed_port_says_how_long_it_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch retries a refused connect until its timeout: a real wait, named with its length."""
    monkeypatch.setattr(parallel_state, "STORE_TIMEOUT_S", TIMEOUT_S)
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(EngineError) as failed:
        connect_store(HOST, port, fresh_store_key())
    took = time.monotonic() - start
    assert TIMEOUT_S <= took < TIMEOUT_S + SLACK_S, f"the connect took {took:.1f}s"
    assert failed.value.field == "parallel.master_port"
    assert failed.value.message.startswith(f"no TP rendezvous store answered at {HOST}:{port} within "
                                           f"{TIMEOUT_S:.0f}s: "), failed.value.message


def test_a_store_connect_that_fails_sooner_names_the_store_and_the_reason() -> None:
    """Where torch gives up on a connect before its timeout (a refusal it does not retry), the time it took is
    said, not the timeout."""
    error = store_unreached(f"{HOST}:1", dist.DistNetworkError("Connection refused"), 0.02, 120.0,
                            "parallel.master_port", "start rank 0")
    assert error.message == (f"cannot reach the TP rendezvous store: rank 0's rendezvous store at {HOST}:1 failed "
                             "after 0.0s, before its 120s wait ran out: Connection refused"), error.message
