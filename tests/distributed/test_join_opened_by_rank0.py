"""A rank that comes to the join early waits for rank 0 to open the group, not inside torch's join.

Rank 0 joins only once every rank came (wait_for_joins), waiting parallel.rendezvous_timeout_seconds for a late one
(a node or pod still starting). A rank that came early went straight into torch's join, which waits only
COLLECTIVE_TIMEOUT_S (60 s) for its peers: a local worker failed there whenever rank 0 waited longer for a rank on
another node, so raising the setting did not help a group with ranks on rank 0's node. Two real processes, gloo on
CPU, the collective timeout cut to 3 s and rank 0 coming 8 s after rank 1 (as it would behind a late rank)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any

import pytest
import torch

COLLECTIVE_S = 3.0
RANK0_LATE_S = 8.0  # how long rank 0 stays away after rank 1 came: past COLLECTIVE_S


def _rank1(port: int, key: bytes, out: Any) -> None:
    from pdlaunch.distributed import parallel_state
    from pdlaunch.distributed.parallel_state import connect_store, destroy_tp_group, init_tp_group

    parallel_state.COLLECTIVE_TIMEOUT_S = COLLECTIVE_S
    try:
        group = init_tp_group(1, 2, torch.device("cpu"), "127.0.0.1", port, connect_store("127.0.0.1", port, key),
                              rendezvous_timeout_s=60.0)
        out.put((1, group.min_int(7)))
        destroy_tp_group()
    except Exception as exc:  # noqa: BLE001 - the parent asserts on it
        out.put((1, f"{type(exc).__name__}: {exc}"))


def _rank0(ports: Any, key: bytes, out: Any) -> None:
    from pdlaunch.distributed import parallel_state
    from pdlaunch.distributed.join_waits import wait_for_joins
    from pdlaunch.distributed.parallel_state import SealedStore, create_store, destroy_tp_group, init_tp_group

    parallel_state.COLLECTIVE_TIMEOUT_S = COLLECTIVE_S
    raw = create_store("127.0.0.1", None, 2)
    store = SealedStore(raw, key)
    ports.put(raw.port)
    try:
        wait_for_joins(store, 2, 120.0, threading.Event().wait)
        # rank 0 still waits for another rank (on another node) this long: the ranks here must not time out
        threading.Event().wait(RANK0_LATE_S)
        group = init_tp_group(0, 2, torch.device("cpu"), "127.0.0.1", raw.port, store)
        out.put((0, group.min_int(5)))
        destroy_tp_group()
    except Exception as exc:  # noqa: BLE001 - the parent asserts on it
        out.put((0, f"{type(exc).__name__}: {exc}"))


@pytest.mark.timeout(300)
def test_a_rank_that_came_early_outwaits_the_collective_timeout() -> None:
    from pdlaunch.distributed.parallel_state import fresh_store_key

    ctx = mp.get_context("spawn")
    key = fresh_store_key()
    ports, out = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_rank0, args=(ports, key, out))]
    procs[0].start()
    procs.append(ctx.Process(target=_rank1, args=(ports.get(timeout=120), key, out)))
    procs[1].start()
    start = time.monotonic()
    try:
        results = dict(out.get(timeout=180) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
    assert results == {0: 5, 1: 5}, results
    assert time.monotonic() - start >= RANK0_LATE_S  # rank 1 did wait past COLLECTIVE_S for rank 0
