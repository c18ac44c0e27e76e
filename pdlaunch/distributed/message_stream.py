"""Sending and receiving messages.py's messages on a rank link; what a peer that sends the wrong thing raises.

Messages are pickled with plain pickle (a tensor is copied, never shared through file descriptors).
Anything that arrives and is not a message (a peer running another pdlaunch version, a message in the
wrong place) is an `UnexpectedMessage` naming the peer and what it sent; a message whose fields do not hold
what it carries (`problem()`, and a call's `reply_problem` for a Reply) is a `MalformedMessage`, one of
them; a peer that stops in the middle of a message is a `MessageStalled`; a frame announcing more than
MAX_MESSAGE_BYTES is an `OversizedMessage`, refused before anything is allocated for it.
"""

from __future__ import annotations

import pickle
import socket
import struct
from multiprocessing.connection import Connection
from typing import TypeVar

from pdlaunch.distributed.messages import MESSAGE_TYPES, ConnectorCall, Message, Reply, describe, short
from pdlaunch.errors import EngineError

# Once poll says a link is readable, the rest of the message follows as fast as the peer's kernel sends it (well
# under a second for a step's inputs of a few MiB): a peer that sends nothing more of it for this long is
# stopped, hung, or its node unreachable, and reading on would block the reader for as long.
MESSAGE_STALL_S = 30.0
_TIMEVAL = struct.Struct("ll")  # struct timeval, as SO_RCVTIMEO takes it
# Far above any message: the largest, a step's block tables ([requests, blocks] int64 per KV-cache group), is
# 512 MiB a group for 1,024 requests beside one of 1M tokens in 16-token blocks. A frame announcing more is a link
# out of step or a peer not speaking this stream; read as given, its length was asked of the OS in one piece.
MAX_MESSAGE_BYTES = 4 << 30
_BAD_LENGTH = ("bad message length",)  # the OSError Connection.recv_bytes raises for a frame over its maxlength

M = TypeVar("M", bound=Message)


class UnexpectedMessage(EngineError):
    """A peer sent something that is not a message of messages.py, or not the one awaited."""

    def __init__(self, peer: str, arrived: object, expected: str | None = None, unreadable: str | None = None,
                 what: str | None = None) -> None:
        self.peer = peer
        self.arrived = arrived  # the object, or the raw bytes when `unreadable` says why they could not be read
        if what is None:
            what = f"a message this version cannot read ({unreadable})" if unreadable else describe(arrived)
        wanted = f" where {expected} was expected" if expected else ""
        super().__init__(f"{peer} sent {what}{wanted}", field="parallel.tp",
                         hint="every rank of a TP group (on every node) must run the same pdlaunch version")


class MalformedMessage(UnexpectedMessage):
    """A peer sent a message of messages.py whose fields do not hold what it carries; `problem` says which.
    `role` names it where its type alone does not (a Reply: "the reply to GetFinished")."""

    def __init__(self, peer: str, arrived: object, problem: str, role: str | None = None) -> None:
        self.problem = problem
        super().__init__(peer, arrived, what=f"a malformed {role or type(arrived).__name__} ({problem}): "
                         f"{short(arrived)}")


class OversizedMessage(UnexpectedMessage):
    """A peer's frame announced more than MAX_MESSAGE_BYTES. The link is out of step: the peer must be failed."""

    def __init__(self, peer: str, expected: str | None) -> None:
        super().__init__(peer, None, expected, what=f"a message longer than {MAX_MESSAGE_BYTES} bytes (the bound: "
                         "a link out of step)")


class MessageStalled(TimeoutError):
    """A peer sent part of a message, then nothing for MESSAGE_STALL_S. An OSError as a broken link is: the
    link is out of step (a later read would start inside this message) and the peer must be failed."""

    def __init__(self, peer: str, expected: str | None, seconds: float) -> None:
        self.peer = peer
        wanted = f" ({expected} was expected)" if expected else ""
        super().__init__(f"{peer} stopped in the middle of a message{wanted} and sent nothing more for "
                         f"{seconds:g}s (stopped, hung, or its node is unreachable)")


def send(conn: Connection, msg: Message) -> None:
    if not isinstance(msg, MESSAGE_TYPES):
        raise TypeError(f"not a TP message: {describe(msg)}")
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > MAX_MESSAGE_BYTES:  # the peer would refuse it as a link out of step
        raise EngineError(f"a {type(msg).__name__} of {len(data)} bytes is longer than the {MAX_MESSAGE_BYTES} bytes "
                          "a rank reads", field="parallel.tp", hint="lower scheduler.max_num_seqs or max_model_len")
    conn.send_bytes(data)


def recv(conn: Connection, peer: str, expected: str | None = None, stall_s: float | None = None) -> Message:
    """The next message from `peer` (e.g. "TP rank 2 (pid 41)", "rank 0"), once `conn.poll` said one is
    arriving; `expected` names what the caller waits for (the errors say it).

    EOFError/OSError when the connection is closed; MessageStalled (an OSError) when the peer sends nothing
    for `stall_s` (default MESSAGE_STALL_S) before the message is whole; UnexpectedMessage for anything but a
    message (OversizedMessage: a frame announcing more than MAX_MESSAGE_BYTES)."""
    data = _read_message(conn, peer, expected, MESSAGE_STALL_S if stall_s is None else stall_s)
    try:
        msg: object = pickle.loads(data)
    except Exception as exc:  # noqa: BLE001 - a class or layout this version does not have
        raise UnexpectedMessage(peer, data, unreadable=f"{type(exc).__name__}: {exc}") from None
    if not isinstance(msg, MESSAGE_TYPES):
        raise UnexpectedMessage(peer, msg, expected)
    problem = msg.problem()
    if problem is not None:
        raise MalformedMessage(peer, msg, problem)
    return msg


def check_reply(call: ConnectorCall, message: Message, peer: str) -> object:
    """The value of `message`, `peer`'s answer to `call`: a Reply holding what the call answers with, or
    UnexpectedMessage (MalformedMessage: a Reply whose value does not fit)."""
    role = f"reply to {type(call).__name__}"
    if not isinstance(message, Reply):
        raise UnexpectedMessage(peer, message, f"the {role}")
    problem = call.reply_problem(message.value)
    if problem is not None:
        raise MalformedMessage(peer, message, problem, role)
    return message.value


def _read_message(conn: Connection, peer: str, expected: str | None, stall_s: float) -> bytes:
    """One message's bytes, with each wait for more of them bounded by `stall_s`. The link is a socket
    (a TCP link, or a local worker's duplex pipe: a socket pair): SO_RCVTIMEO bounds its reads for this one
    message, then goes back to what it was (a link may idle between messages for as long as it likes)."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.size)
        micros = max(1, round(stall_s * 1_000_000))  # SO_RCVTIMEO 0 would mean no bound at all
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(*divmod(micros, 1_000_000)))
        try:
            return conn.recv_bytes(MAX_MESSAGE_BYTES)
        except BlockingIOError:  # what a read past SO_RCVTIMEO raises
            raise MessageStalled(peer, expected, stall_s) from None
        except OSError as exc:
            if exc.args == _BAD_LENGTH:
                raise OversizedMessage(peer, expected) from None
            raise
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, before)
    finally:
        sock.detach()  # the fd stays owned by `conn`


def recv_as(conn: Connection, peer: str, kind: type[M]) -> M:
    """The next message from `peer`, which must be a `kind`."""
    msg = recv(conn, peer, kind.__name__)
    if not isinstance(msg, kind):
        raise UnexpectedMessage(peer, msg, kind.__name__)
    return msg
