"""TP ranks that finish loading their weights far apart (one node's disk cold): the first collective after loading
waited at most COLLECTIVE_TIMEOUT_S (60 s) on the late rank and failed with a raw gloo timeout naming no rank; every
rank now waits at TPGroup.loaded (a barrier with LOAD_WAIT_S, 900 s) first, so the collective after it meets at
once. Two real processes, gloo on CPU, the collective timeout cut to 3 s and one rank loading 6 s late."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any

import pytest
import torch

LATE_S = 6.0


def _rank(rank: int, port: int, key: bytes, barrier: bool, out: Any) -> None:
    from pdlaunch.distributed import parallel_state
    from pdlaunch.distributed.parallel_state import connect_store, destroy_tp_group, init_tp_group

    parallel_state.COLLECTIVE_TIMEOUT_S = 3.0
    try:
        store = parallel_state._serving_store if rank == 0 else connect_store("127.0.0.1", port, key)  # noqa: SLF001
        group = init_tp_group(rank, 2, torch.device("cpu"), "127.0.0.1", port, store)
        if rank == 1:
            time.sleep(LATE_S)  # loading its weights from a cold disk
        if barrier:
            group.loaded(timeout_s=60.0)
        out.put((rank, group.min_int(rank + 5)))
        destroy_tp_group()
    except Exception as exc:  # noqa: BLE001 - the parent asserts on it
        out.put((rank, f"{type(exc).__name__}: {exc}"))


def _rank0(port_out: Any, key: bytes, barrier: bool, out: Any) -> None:
    from pdlaunch.distributed import parallel_state
    from pdlaunch.distributed.join_waits import wait_for_joins
    from pdlaunch.distributed.parallel_state import SealedStore, create_store

    raw = create_store("127.0.0.1", None, 2)
    store = SealedStore(raw, key)
    parallel_state._serving_store = store  # type: ignore[attr-defined]  # noqa: SLF001
    port_out.put(raw.port)
    # as tp_startup does: join only once rank 1 came (spawning it and importing torch outlasts the cut 3 s join)
    wait_for_joins(store, 2, 120.0, threading.Event().wait)
    _rank(0, raw.port, key, barrier, out)


def _run(barrier: bool) -> dict[int, Any]:
    from pdlaunch.distributed.parallel_state import fresh_store_key

    ctx = mp.get_context("spawn")
    key = fresh_store_key()
    ports, out = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_rank0, args=(ports, key, barrier, out))]
    procs[0].start()
    port = ports.get(timeout=120)
    procs.append(ctx.Process(target=_rank, args=(1, port, key, barrier, out)))
    procs[1].start()
    results = dict(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
    return results


@pytest.mark.timeout(300)
def test_the_collective_after_loading_waits_for_a_rank_loading_late() -> None:
    assert _run(barrier=True) == {0: 5, 1: 5}


@pytest.mark.timeout(300)
def test_without_the_wait_the_first_collective_times_out_on_the_late_rank() -> None:
    """What the barrier is for: the same late rank fails the bare collective on the early one."""
    results = _run(barrier=False)
    assert isinstance(results[0], str) and "timed out" in results[0].lower(), results
