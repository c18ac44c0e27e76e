"""Rank 0's watchdog over a formed TP group: it follows the local workers' process sentinels and the remote
ranks' links. A rank that dies, or whose link closes, fails the instance with the reason the rank sent
(RankFailed) and how it ended; the next step (idle engines step every few seconds too) raises it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

from pdlaunch.distributed.link_socket import is_closed
from pdlaunch.distributed.tp_ranks import TPRanks

log = logging.getLogger(__name__)


def watch(ranks: TPRanks, fail: Callable[[str], None]) -> None:
    """Until `ranks` close: call `fail` with the failure of each rank that ends."""
    sentinels = {p.sentinel: rank for rank, p in ranks.procs.items()}
    remote = dict(ranks.remote)
    links = dict(enumerate(ranks.links, start=1))  # shutdown empties ranks.links under this thread
    while not ranks.closing.is_set() and (sentinels or remote):
        # wait() hands back some of the objects it was given: here process sentinels, ints.
        ended = [s for s in wait(list(sentinels), timeout=0.5) if isinstance(s, int)] if sentinels else []
        if not sentinels:
            ranks.closing.wait(0.5)
        for sentinel in ended:
            rank = sentinels.pop(sentinel)
            if ranks.closing.is_set():
                return
            report_dead(ranks, rank, links[rank], ranks.ended(rank) or f"{ranks.where(rank)} exited", fail)
        for rank in [r for r in remote if is_closed(links[r])]:
            if ranks.closing.is_set():
                return
            remote.pop(rank)
            report_dead(ranks, rank, links[rank], f"{ranks.where(rank)} closed its connection (the rank, its "
                        "node's launcher or the node is gone)", fail)


def report_dead(ranks: TPRanks, rank: int, conn: Connection, ended: str, fail: Callable[[str], None]) -> None:
    """Fail the instance for rank `rank`, which `ended`: with the reason it sent on `conn`, if it sent one."""
    reason = ranks.drain_reason(rank, conn)
    message = f"{reason} ({ended})" if reason else ended
    fail(message)
    log.error("%s: the instance cannot serve without it", message)
