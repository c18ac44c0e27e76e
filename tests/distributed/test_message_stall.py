"""A peer that stops in the middle of a message (it sent a length header and part of the body, then nothing:
stopped, hung, or its node unreachable). Once poll said the link was readable, the read had no bound: rank 0
(or a rank reading rank 0's stream) waited forever inside it. Now the read fails after MESSAGE_STALL_S,
naming the peer and what was being read, and rank 0 fails the instance with it."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable
from multiprocessing import Pipe
from multiprocessing.connection import Connection

import pytest

from pdlaunch.distributed import message_stream
from pdlaunch.distributed.message_stream import MessageStalled, recv, send
from pdlaunch.distributed.messages import GetFinished, Reply
from pdlaunch.distributed.tp_startup import RankEnded, wait_ready
from pdlaunch.errors import EngineError
from tests.distributed.test_rank_stream import RecordingRunner, rank0_side, run_worker_loop

STALL_S = 0.5
GUARD_S = 60.0  # only bounds a broken test: without the bound the read never returns


@pytest.fixture(autouse=True)
def short_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(message_stream, "MESSAGE_STALL_S", STALL_S)


def half_message(conn: Connection) -> None:
    """What a peer stopped mid-send leaves on the link: a header for 1000 bytes, and 10 of them."""
    os.write(conn.fileno(), struct.pack("!i", 1000) + b"x" * 10)


def outcome_of(read: Callable[[], object], writer: Connection) -> BaseException:
    """What `read` raised, in a thread bounded by GUARD_S; a read still blocked then fails the test (after
    closing `writer`, which ends it)."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            read()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(GUARD_S)
    if reader.is_alive():
        writer.close()  # EOF inside the message ends the read
        reader.join(GUARD_S)
        pytest.fail(f"the read of a half-sent message was still blocked after {GUARD_S:.0f}s")
    assert len(raised) == 1, "the read of a half-sent message returned"
    return raised[0]


def receive_timeout(conn: Connection) -> bytes:
    probe = socket.socket(fileno=conn.fileno())
    try:
        return probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
    finally:
        probe.detach()


def test_a_half_sent_message_fails_the_read_naming_the_peer_and_what_was_read() -> None:
    here, there = Pipe()
    half_message(here)
    assert there.poll(0)
    error = outcome_of(lambda: recv(there, "TP rank 2 (pid 41)", "the reply to GetFinished"), here)
    assert isinstance(error, MessageStalled) and isinstance(error, OSError), repr(error)
    assert str(error) == ("TP rank 2 (pid 41) stopped in the middle of a message (the reply to GetFinished was "
                          "expected) and sent nothing more for 0.5s (stopped, hung, or its node is unreachable)")


def test_a_link_keeps_no_receive_timeout_between_messages() -> None:
    """The bound is for one message: a link may idle for minutes between steps."""
    here, there = Pipe()
    before = receive_timeout(there)
    send(here, Reply(True))
    assert recv(there, "TP rank 1") == Reply(True)
    assert receive_timeout(there) == before == struct.pack("ll", 0, 0)


def test_rank0_fails_the_instance_for_a_rank_that_stalls_in_its_reply() -> None:
    executor, (rank1,) = rank0_side(1)
    half_message(rank1)
    error = outcome_of(lambda: executor._mirror(GetFinished()), rank1)  # noqa: SLF001
    assert isinstance(error, EngineError), repr(error)
    assert error.message.startswith("TP rank 1 on node 1 (10.0.0.2) stopped in the middle of a message (the "
                                    "reply to GetFinished was expected)"), error.message
    assert executor.failure == error.message


def test_rank0_names_a_rank_that_stalls_in_its_ready_at_startup() -> None:
    executor, (rank1,) = rank0_side(1)
    half_message(rank1)
    error = outcome_of(lambda: wait_ready(executor._ranks, 1), rank1)  # noqa: SLF001
    assert isinstance(error, RankEnded), repr(error)
    assert error.message == ("TP rank 1 on node 1 (10.0.0.2) stopped in the middle of a message (Ready was "
                             "expected) and sent nothing more for 0.5s (stopped, hung, or its node is unreachable)")
    assert error.field == "parallel.tp" and "engine-rank1.log" in (error.hint or ""), error.hint


def test_a_rank_fails_when_rank0_stalls_in_a_message() -> None:
    """The rank then exits (worker.serve_rank reports the error) instead of hanging in its read."""
    rank0, worker = Pipe()
    half_message(rank0)
    error = outcome_of(lambda: run_worker_loop(worker, None, RecordingRunner()), rank0)
    assert isinstance(error, MessageStalled), repr(error)
    assert str(error).startswith("rank 0 stopped in the middle of a message (a step, a connector call or "
                                 "shutdown was expected)"), str(error)
