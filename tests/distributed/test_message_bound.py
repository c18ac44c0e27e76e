"""A rank link's frame announces its length; a length far beyond any message (a link out of step, a peer that
does not speak this stream) was read as given: `recv` asked the OS for that many bytes and raised a bare
MemoryError, naming no peer and caught by none of the readers. The watchdog's thread died on it (no later rank
death was reported) and a worker reported "TP rank 1 failed: " with nothing after. A length over
MAX_MESSAGE_BYTES is now refused before anything is allocated, as a message naming the peer; a message over
it is refused where it is sent."""

from __future__ import annotations

import os
import struct
import time
from multiprocessing import Pipe
from multiprocessing.connection import Connection

import pytest

from pdlaunch.distributed import message_stream
from pdlaunch.distributed.message_stream import OversizedMessage, recv, send
from pdlaunch.distributed.messages import StartLoad
from pdlaunch.distributed.tp_ranks import TPRanks
from pdlaunch.errors import EngineError

PEER = "TP rank 1 (pid 41)"
TERABYTE = 1 << 40


def announce(conn: Connection, size: int) -> None:
    """A frame header announcing `size` bytes (multiprocessing's framing: -1, then an 8-byte length), and a few."""
    os.write(conn.fileno(), struct.pack("!i", -1) + struct.pack("!Q", size) + b"xyz")


def test_a_frame_announcing_more_than_the_bound_is_refused_naming_the_peer() -> None:
    here, there = Pipe()
    announce(here, TERABYTE)
    began = time.monotonic()
    with pytest.raises(OversizedMessage) as err:
        recv(there, PEER, "the reply to GetFinished", stall_s=30.0)
    assert time.monotonic() - began < 10.0, "it waited for the bytes announced"
    assert err.value.message == (f"{PEER} sent a message longer than {message_stream.MAX_MESSAGE_BYTES} bytes "
                                 "(the bound: a link out of step) where the reply to GetFinished was expected")
    assert err.value.peer == PEER and err.value.field == "parallel.tp"


def test_the_watchdog_reading_why_a_rank_ended_gets_it_as_the_reason() -> None:
    here, there = Pipe()
    ranks = TPRanks("engine", 2)
    ranks.remote = {1: "node 1 (10.0.0.2)"}
    announce(here, TERABYTE)
    reason = ranks.drain_reason(1, there)
    assert reason is not None and "TP rank 1 on node 1 (10.0.0.2) sent a message longer than " in reason, reason


def test_a_message_over_the_bound_is_refused_where_it_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(message_stream, "MAX_MESSAGE_BYTES", 4096)
    here, there = Pipe()
    with pytest.raises(EngineError, match=r"a StartLoad of \d+ bytes is longer than the 4096 bytes a rank reads"):
        send(here, StartLoad("r", list(range(2000)), None, [[1]], 0, 2000))
    assert not there.poll(0)
    send(here, StartLoad("r", list(range(200)), None, [[1]], 0, 200))  # within it
    assert recv(there, PEER) == StartLoad("r", list(range(200)), None, [[1]], 0, 200)
