"""Rank 0's watchdog over its remote ranks' links during shutdown. `is_closed` read the link's fd outside its
try: on a link rank 0 had closed already (shutdown closes them under the running watchdog) it raised OSError
("handle is closed") and the watchdog thread died with a traceback; shutdown also empties the executor's link
list, which the watchdog indexed (IndexError). A closed link is now closed (True), and the watchdog keeps the
links it started with."""

from __future__ import annotations

import threading
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

import pytest

from pdlaunch.distributed import tp_watchdog
from pdlaunch.distributed.link_socket import is_closed, peer_address
from tests.distributed.test_rank_stream import rank0_side

GUARD_S = 20.0  # only bounds a broken test


def test_a_link_closed_here_is_closed() -> None:
    here, there = Pipe()
    assert not is_closed(here)
    here.close()
    assert is_closed(here)
    assert peer_address(here) is None
    there.close()


@pytest.fixture
def thread_errors() -> Any:
    """What threads raised (the hook that prints a dead thread's traceback), collected for the test."""
    raised: list[BaseException | None] = []
    before = threading.excepthook
    threading.excepthook = lambda args: raised.append(args.exc_value)
    yield raised
    threading.excepthook = before


def test_the_watchdog_survives_links_closed_and_dropped_under_it(thread_errors: list[BaseException | None],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    executor, (rank1,) = rank0_side(1)
    watching = threading.Event()

    def first_look(conn: Connection) -> bool:
        watching.set()
        return is_closed(conn)

    monkeypatch.setattr(tp_watchdog, "is_closed", first_look)
    watchdog = threading.Thread(target=tp_watchdog.watch, args=(executor._ranks, executor._fail), daemon=True)  # noqa: SLF001
    watchdog.start()
    assert watching.wait(GUARD_S)
    executor._ranks.links[0].close()  # noqa: SLF001 - as shutdown closes them, the watchdog past its closing check
    executor._ranks.links = []  # noqa: SLF001 - and then drops them
    watchdog.join(GUARD_S)
    assert not watchdog.is_alive(), "the watchdog kept watching a closed link"
    assert thread_errors == []
    assert executor.failure == "TP rank 1 on node 1 (10.0.0.2) closed its connection (the rank, its node's launcher " \
        "or the node is gone)"
    rank1.close()
