"""A rank that says why it failed (RankFailed) before it ends: rank 0 records that reason as the instance's
failure, whichever of its threads reads it: the engine thread answering a mirrored connector call, or the
watchdog that sees the rank's process exit or its link to another node close."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import socket
import threading
from multiprocessing.connection import Connection

import pytest

from pdlaunch.distributed.link_socket import is_closed
from pdlaunch.distributed.message_stream import send
from pdlaunch.distributed.messages import GetFinished, RankFailed
from pdlaunch.distributed.tp_executor import TPExecutor
from pdlaunch.distributed.tp_ranks import TPRanks
from pdlaunch.distributed.tp_watchdog import watch
from pdlaunch.errors import EngineError
from tests.distributed.rank_exits import say_and_exit
from tests.distributed.test_rank_stream import rank0_side

GUARD_S = 60.0  # only bounds a broken test; the watchdog reports within a poll (0.5 s) of the rank's end
WHY = "TP rank 1 failed: CUDA error: an illegal memory access was encountered"


def rank0_with(conn: Connection, procs: dict[int, mp.process.BaseProcess], remote: dict[int, str]) -> TPExecutor:
    """Rank 0's executor with one rank link and its process (local) or node (remote): what the watchdog reads."""
    ranks = TPRanks("engine", 2)
    ranks.links, ranks.procs, ranks.remote = [conn], procs, remote
    executor = TPExecutor.__new__(TPExecutor)
    executor._ranks, executor.failure = ranks, None  # noqa: SLF001
    return executor


def watch_until_reported(executor: TPExecutor) -> None:
    watchdog = threading.Thread(target=watch, args=(executor._ranks, executor._fail), daemon=True)  # noqa: SLF001
    watchdog.start()
    watchdog.join(GUARD_S)
    executor._ranks.closing.set()  # noqa: SLF001 - ends a watchdog that never saw the rank go
    assert not watchdog.is_alive(), "the watchdog never reported the rank"


def test_a_failure_answering_a_mirrored_call_fails_the_instance() -> None:
    executor, (rank1,) = rank0_side(1)
    send(rank1, RankFailed(WHY))
    with pytest.raises(EngineError, match="illegal memory access"):
        executor._mirror(GetFinished())  # noqa: SLF001
    # the engine's health check (every step, idle or not) now fails the instance with that reason
    with pytest.raises(EngineError, match="illegal memory access"):
        executor.check_health()


def test_the_watchdog_reports_a_dead_local_rank_with_the_reason_it_sent() -> None:
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=say_and_exit, args=(theirs, pickle.dumps(RankFailed(WHY)), 1), daemon=True)
    proc.start()
    theirs.close()
    executor = rank0_with(ours, {1: proc}, {})
    watch_until_reported(executor)
    assert executor.failure == f"{WHY} (TP rank 1 (pid {proc.pid}) exited with code 1)"


def tcp_link() -> tuple[Connection, Connection]:
    """Both ends of a TCP connection, as rank 0 and a rank on another node hold their link (remote_link.py)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return Connection(accepted.detach()), Connection(client.detach())


def test_a_remote_link_closed_behind_the_reason_the_rank_sent_is_closed() -> None:
    ours, theirs = tcp_link()
    assert not is_closed(ours)
    send(theirs, RankFailed(WHY))
    assert not is_closed(ours)  # a message waiting to be read is not a close
    theirs.close()
    assert is_closed(ours)


def test_the_watchdog_reports_a_remote_rank_that_closed_its_link_with_the_reason_it_sent() -> None:
    ours, theirs = tcp_link()
    executor = rank0_with(ours, {}, {1: "node 1 (127.0.0.1)"})
    send(theirs, RankFailed(WHY))
    theirs.close()
    watch_until_reported(executor)
    assert executor.failure is not None and executor.failure.startswith(f"{WHY} (TP rank 1 on node 1 (127.0.0.1) "
                                                                        "closed its connection"), executor.failure
