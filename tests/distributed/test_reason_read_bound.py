"""Reading why a rank ended (TPRanks.drain_reason, the watchdog's and startup's read of what is left on the
rank's link) holds that link's lock. It read on for as long as messages were pending, each read bounded only
by MESSAGE_STALL_S (30 s): a peer that sent half a message and stalled held the lock that long, and the engine
thread waiting for it to read a connector reply (_mirror) stalled behind it without a word. The reason read is
now bounded by REASON_READ_S, a stall in it is the reason given, and the engine thread waits for a busy link at
most LINK_BUSY_WAIT_S, then fails the rank saying why."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from pdlaunch.distributed import message_stream, tp_ranks
from pdlaunch.distributed.message_stream import send
from pdlaunch.distributed.messages import GetFinished, Reply
from pdlaunch.distributed.tp_watchdog import report_dead
from pdlaunch.errors import EngineError
from tests.distributed.test_message_stall import half_message
from tests.distributed.test_rank_stream import rank0_side

READ_S = 0.3  # REASON_READ_S here
GUARD_S = 20.0  # well past the bounds (about 1 s here), well short of the stall the bound replaces
ENDED = "TP rank 1 on node 1 (10.0.0.2) closed its connection"


@pytest.fixture(autouse=True)
def bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(message_stream, "MESSAGE_STALL_S", 120.0)  # what a reader without its own bound waits
    monkeypatch.setattr(tp_ranks, "REASON_READ_S", READ_S, raising=False)
    monkeypatch.setattr(tp_ranks, "LINK_BUSY_WAIT_S", 3 * READ_S, raising=False)


def in_thread(run: Callable[[], object]) -> tuple[threading.Event, list[BaseException]]:
    """Start `run`; the event is set once it returned or raised (what it raised is in the list)."""
    done, raised = threading.Event(), []

    def target() -> None:
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)
        finally:
            done.set()

    threading.Thread(target=target, daemon=True).start()
    return done, raised


def test_the_watchdog_reads_a_half_sent_reason_within_the_bound_and_says_it_stalled() -> None:
    executor, (rank1,) = rank0_side(1)
    half_message(rank1)
    done, raised = in_thread(lambda: report_dead(executor._ranks, 1, executor._ranks.links[0], ENDED,  # noqa: SLF001
                                                    executor._fail))  # noqa: SLF001
    finished = done.wait(GUARD_S)
    rank1.close()  # ends a read still blocked (EOF inside the message)
    assert finished, f"reading the reason of a rank that stalled mid-message took over {GUARD_S:.0f}s"
    assert not raised, raised
    assert executor.failure == ("TP rank 1 on node 1 (10.0.0.2) stopped in the middle of a message and sent nothing "
                                f"more for {READ_S:g}s (stopped, hung, or its node is unreachable) ({ENDED})")


def test_the_engine_thread_does_not_wait_on_a_busy_link_past_its_bound_without_saying_why() -> None:
    executor, (rank1,) = rank0_side(1)
    send(rank1, Reply(object()))
    lock = executor._ranks.recv_locks[1]  # noqa: SLF001
    lock.acquire()  # another reader that never lets go
    try:
        done, raised = in_thread(lambda: executor._mirror(GetFinished()))  # noqa: SLF001
        finished = done.wait(GUARD_S)
    finally:
        lock.release()
    assert finished, f"the engine thread waited over {GUARD_S:.0f}s for a busy link"
    assert len(raised) == 1 and isinstance(raised[0], EngineError), raised
    assert raised[0].message == ("TP rank 1 on node 1 (10.0.0.2) is unreachable: its link stayed busy (the watchdog "
                                 "reading why the rank ended) for 1s while the reply to GetFinished waited")
