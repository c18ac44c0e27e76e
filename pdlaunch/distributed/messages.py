"""What TP rank 0 and its other ranks say to each other: one type per message, and `send`/`recv`.

The stream is a multiprocessing `Connection`: a pipe to a local worker (worker.py), an authenticated
TCP link to a rank on another node (remote_link.py). Messages are pickled with plain pickle (a tensor
is copied, never shared through file descriptors).

Rank 0 -> rank r:
  Setup(device_type, dtype_name, max_model_len)  what a remote rank cannot read from its own config
  Execute(inputs)                          forward this rank's shard of one engine step
  StartLoad / RequestFinished / GetFinished / AbortLoad / ReleaseHeld
                                           mirror a scheduler-side call on rank r's own connector
  Shutdown()                               leave the group and exit 0
Rank r -> rank 0:
  Hello(rank)                              a remote rank's first message on its link
  Ready(engine_id, side_channel_port, side_channel_host)   built, once
  Reply(value)                             the connector's answer, for calls whose `reply_type` is set
  RankFailed(message)                      the reason, just before the rank exits non-zero

Anything else that arrives (a peer running another pdlaunch version, a message in the wrong place)
is an `UnexpectedMessage` naming the peer and what it sent; a peer that stops in the middle of a message
is a `MessageStalled`.
"""

from __future__ import annotations

import pickle
import socket
import struct
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import ClassVar, Final, TypeAlias, TypeVar

from pdlaunch.errors import EngineError
from pdlaunch.kv_transfer.base import KVConnectorEvents
from pdlaunch.kv_transfer.params import KVTransferParams
from pdlaunch.runner.step_inputs import StepInputs

# Once poll says a link is readable, the rest of the message follows as fast as the peer's kernel sends it (well
# under a second for a step's inputs of a few MiB): a peer that sends nothing more of it for this long is
# stopped, hung, or its node unreachable, and reading on would block the reader for as long.
MESSAGE_STALL_S = 30.0
_TIMEVAL = struct.Struct("ll")  # struct timeval, as SO_RCVTIMEO takes it

# Frozen slotted dataclasses: pickled as the class name plus their fields, built without validation
# (Execute goes out every engine step; an isinstance check on each end is all it costs).

@dataclass(frozen=True, slots=True)
class Setup:
    device_type: str
    dtype_name: str
    max_model_len: int


@dataclass(frozen=True, slots=True)
class Execute:
    inputs: StepInputs


@dataclass(frozen=True, slots=True)
class MirroredCall:
    """A scheduler-side call rank 0 made on its connector, to repeat on rank r's (tp_connector.py)."""

    # Type of the value rank r answers with (isinstance-checked by rank 0); None: no answer is sent.
    reply_type: ClassVar[type | tuple[type, ...] | None] = bool


@dataclass(frozen=True, slots=True)
class StartLoad(MirroredCall):
    reply_type: ClassVar[type | tuple[type, ...] | None] = None
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: KVTransferParams | None
    block_ids: list[list[int]]
    num_local_computed_tokens: int
    num_external_tokens: int


@dataclass(frozen=True, slots=True)
class RequestFinished(MirroredCall):
    reply_type: ClassVar[type | tuple[type, ...] | None] = tuple  # (hold, kv_transfer_params)
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: KVTransferParams | None
    block_ids: list[list[int]]


@dataclass(frozen=True, slots=True)
class GetFinished(MirroredCall):
    reply_type: ClassVar[type | tuple[type, ...] | None] = KVConnectorEvents


@dataclass(frozen=True, slots=True)
class AbortLoad(MirroredCall):
    request_id: str


@dataclass(frozen=True, slots=True)
class ReleaseHeld(MirroredCall):
    request_id: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class Hello:
    rank: int  # the sender's TP rank; rank 0 accepts each awaited rank once


@dataclass(frozen=True, slots=True)
class Ready:
    """Rank r is built: engine_id as it holds it after the sync with rank 0 (/info lists it per rank);
    the side channel is its own connector's (None without one), advertised to decode (tp_connector.py)."""

    engine_id: str
    side_channel_port: int | None
    side_channel_host: str | None


@dataclass(frozen=True, slots=True)
class Reply:
    value: object  # what the connector call returned: an instance of that call's reply_type


@dataclass(frozen=True, slots=True)
class RankFailed:
    message: str


ConnectorCall: TypeAlias = StartLoad | RequestFinished | GetFinished | AbortLoad | ReleaseHeld
Message: TypeAlias = Execute | ConnectorCall | Shutdown | Setup | Hello | Ready | Reply | RankFailed
# The step message first: isinstance walks the tuple in order.
MESSAGE_TYPES: Final = (Execute, GetFinished, StartLoad, RequestFinished, AbortLoad, ReleaseHeld, Reply, Shutdown,
                        Setup, Hello, Ready, RankFailed)

M = TypeVar("M", bound=Message)


class UnexpectedMessage(EngineError):
    """A peer sent something that is not a message of this module, or not the one awaited."""

    def __init__(self, peer: str, arrived: object, expected: str | None = None, unreadable: str | None = None) -> None:
        self.peer = peer
        self.arrived = arrived  # the object, or the raw bytes when `unreadable` says why they could not be read
        what = f"a message this version cannot read ({unreadable})" if unreadable else describe(arrived)
        wanted = f" where {expected} was expected" if expected else ""
        super().__init__(f"{peer} sent {what}{wanted}", field="parallel.tp",
                         hint="every rank of a TP group (on every node) must run the same pdlaunch version")


class MessageStalled(TimeoutError):
    """A peer sent part of a message, then nothing for MESSAGE_STALL_S. An OSError as a broken link is: the
    link is out of step (a later read would start inside this message) and the peer must be failed."""

    def __init__(self, peer: str, expected: str | None, seconds: float) -> None:
        self.peer = peer
        wanted = f" ({expected} was expected)" if expected else ""
        super().__init__(f"{peer} stopped in the middle of a message{wanted} and sent nothing more for "
                         f"{seconds:g}s (stopped, hung, or its node is unreachable)")


def describe(arrived: object) -> str:
    """What arrived, short enough for one log line."""
    text = repr(arrived)
    return f"{type(arrived).__name__} {text[:120]}{'...' if len(text) > 120 else ''}"


def send(conn: Connection, msg: Message) -> None:
    if not isinstance(msg, MESSAGE_TYPES):
        raise TypeError(f"not a TP message: {describe(msg)}")
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection, peer: str, expected: str | None = None, stall_s: float | None = None) -> Message:
    """The next message from `peer` (e.g. "TP rank 2 (pid 41)", "rank 0"), once `conn.poll` said one is
    arriving; `expected` names what the caller waits for (the errors say it).

    EOFError/OSError when the connection is closed; MessageStalled (an OSError) when the peer sends nothing
    for `stall_s` (default MESSAGE_STALL_S) before the message is whole; UnexpectedMessage for anything but a
    message."""
    data = _read_message(conn, peer, expected, MESSAGE_STALL_S if stall_s is None else stall_s)
    try:
        msg: object = pickle.loads(data)
    except Exception as exc:  # noqa: BLE001 - a class or layout this version does not have
        raise UnexpectedMessage(peer, data, unreadable=f"{type(exc).__name__}: {exc}") from None
    if not isinstance(msg, MESSAGE_TYPES):
        raise UnexpectedMessage(peer, msg, expected)
    return msg


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
            return conn.recv_bytes()
        except BlockingIOError:  # what a read past SO_RCVTIMEO raises
            raise MessageStalled(peer, expected, stall_s) from None
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
