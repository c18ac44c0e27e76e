"""A rank's answer to a mirrored call that rank 0 cannot read (bytes that are no message of this version, an
object that is not a message, a message whose fields do not fit) fails the instance, as a reply of the wrong
type does: the later ranks' replies stay unread on their links, so a later call would take one of them as its
own. It went unrecorded: a release of held KV (run on the engine thread for an HTTP caller, the engine serving
on after it) raised, and the next AbortLoad took rank 2's stale answer to the release as rank 2's answer."""

from __future__ import annotations

import pickle
from multiprocessing.connection import Connection

import pytest

from pdlaunch.distributed.message_stream import UnexpectedMessage, send
from pdlaunch.distributed.messages import AbortLoad, RankFailed, ReleaseHeld, Reply
from pdlaunch.errors import EngineError
from tests.distributed.test_rank_stream import rank0_side

PEER = r"TP rank 1 on node 1 \(10.0.0.2\) sent "


def unreadable(conn: Connection) -> None:
    conn.send_bytes(b"\x80\x05not a pickle")


def not_a_message(conn: Connection) -> None:
    conn.send_bytes(pickle.dumps({"value": True}))


def malformed(conn: Connection) -> None:
    send(conn, RankFailed(RuntimeError("oom")))  # type: ignore[arg-type]  # the point: not a str


@pytest.mark.parametrize(("answer", "said"), [
    (unreadable, "a message this version cannot read"),
    (not_a_message, "dict {'value': True}"),
    (malformed, r"a malformed RankFailed \(message is a RuntimeError"),
], ids=["unreadable", "not a message", "malformed"])
def test_an_answer_rank0_cannot_read_fails_the_instance_before_a_stale_reply_is_taken(answer, said) -> None:  # type: ignore[no-untyped-def]
    executor, (rank1, rank2) = rank0_side(2)
    answer(rank1)
    send(rank2, Reply(True))  # rank 2's answer to the release: left unread on its link
    with pytest.raises(UnexpectedMessage, match=PEER + said):
        executor._mirror(ReleaseHeld("r"))  # noqa: SLF001
    with pytest.raises(EngineError, match=PEER + said):
        executor.check_health()
    send(rank1, Reply(False))
    send(rank2, Reply(False))
    with pytest.raises(EngineError, match=PEER + said):  # not [False, True]: rank 2's True answered the release
        executor._mirror(AbortLoad("r"))  # noqa: SLF001
