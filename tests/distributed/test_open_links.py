"""Rank 0's links to its TP ranks: every send bounded, and each remote rank's Setup sent once, whatever the
number of local worker links beside it."""

from __future__ import annotations

import multiprocessing as mp

from pdlaunch.distributed.messages import Setup
from pdlaunch.distributed.tp_startup import open_links


def test_each_remote_rank_gets_one_setup_and_a_local_rank_none() -> None:
    pipes = {rank: mp.Pipe(duplex=True) for rank in (1, 2, 3)}
    links = {rank: ours for rank, (ours, _) in pipes.items()}
    open_links(links, {2: "node 1 (10.0.0.2)", 3: "node 1 (10.0.0.2)"}, Setup("cpu", "float32", 64))
    got = {rank: [] for rank in pipes}
    for rank, (_, theirs) in pipes.items():
        while theirs.poll(0):
            got[rank].append(theirs.recv_bytes())
    assert [len(got[r]) for r in (1, 2, 3)] == [0, 1, 1], got
