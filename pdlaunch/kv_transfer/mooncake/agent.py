"""MooncakeAgent: transport.TransferAgent over a Mooncake TransferEngine, so that the connector's
prefill side (prefill/: holds, leases, push sender pool) and decode side (decode/: handshakes, load
strategies, drains, resharding) run unchanged on Mooncake.

What maps to what:
- agent metadata: {"name", "session", "protocol"} (the engine's session id, and tcp or rdma); the
  prefill gives it only in its authenticated handshake answer, the decode only in an authenticated push
  request (side_channel/). Each engine resolves `mooncake_protocol: auto` on its own host, and engines
  on different protocols cannot move bytes between each other: a peer on another one is refused when it
  is added (the decode's handshake, the prefill's push request), not at each transfer with a bare code.
- READ/WRITE: (address, length) pieces, run on the transfer pool (mooncake/sender.py) and ended only once
  every piece ended (mooncake/engine.py `transfer`).
- notifications: Mooncake's TransferNotify (a zero-length transfer: a network round trip, and a timeout when
  the peer does not answer), sent from notifier threads (mooncake/notifier.py) so that the engine thread
  never waits on the network; a peer gets them in order, and one that does not answer delays only its own.
  push_done leaves from the WRITE's own thread right after the bytes (from the sender's thread for a push of
  no block), and its failure fails the push (the decode learns of the WRITE only through it), once a second
  send failed too. read_done is queued once the READ's bytes are in and the READ counts without waiting for
  it: a lost one is logged (the prefill frees the blocks at its lease's end instead). Any process that
  reaches the engine's port can send a notification, so each carries an HMAC of its payload under a key
  derived from the deployment secret; one without a valid MAC is dropped (a forged push_done would pass
  garbage KV to the model, a forged release would free another request's blocks).
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdlaunch.config.serving_env import MC_TRANSFER_SECONDS_PER_BYTE
from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.auth import RateLimitedWarning, derive_key, mac, mac_ok
from pdlaunch.kv_transfer.mooncake.engine import MooncakeEngine
from pdlaunch.kv_transfer.mooncake.notifier import SessionNotifier
from pdlaunch.kv_transfer.mooncake.sender import RELEASE_WAIT_SECONDS, MooncakeXfer, TransferPool
from pdlaunch.kv_transfer.notifications import LOST_NOTIFICATION, parse_notification

logger = logging.getLogger(__name__)

NOTIFY_PURPOSE = "pdlaunch mooncake notification v1"
MAX_NOTIFY_CHARS = 8192
_MAC_HEX = 64


class PeerMetadata(BaseModel):
    """What a Mooncake agent tells its peers: its name, the session id transfers address, and the protocol its
    engine moves bytes with (a peer must use the same one)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=512)]
    session: Annotated[str, Field(min_length=3, max_length=300, pattern=r"^[A-Za-z0-9_.:\[\]-]+:\d{1,5}$")]
    protocol: Literal["tcp", "rdma"]


class MooncakeAgent:
    """One TransferEngine with one engine's (one TP rank's) KV cache registered."""

    release_wait_seconds = RELEASE_WAIT_SECONDS  # MooncakeXfer.release waits for a running WRITE
    release_wait_seconds_per_byte = MC_TRANSFER_SECONDS_PER_BYTE  # ... longer by its bytes (MooncakeXfer.release_wait)
    release_cancels = False  # a running READ or WRITE ends only by itself or by Mooncake's transfer timeout

    def __init__(self, name: str, engine: MooncakeEngine, pool: TransferPool, secret: str) -> None:
        self.name = name
        self.engine = engine
        self.pool = pool
        self._notifier = SessionNotifier(pool.device_index)
        self._key = derive_key(secret, NOTIFY_PURPOSE)
        self._remotes: dict[str, str] = {}  # agent name -> session id
        self._kv_addrs: list[int] = []  # what `register` registered (extra buffers stay across a sleep)
        self._bad = RateLimitedWarning(logger)
        self.mem_type = "DRAM"
        self.device_id = 0

    # -- memory -------------------------------------------------------------------------------
    def register(self, kv_caches: list[torch.Tensor]) -> None:
        if self._kv_addrs:
            raise KVTransferError("KV caches are already registered with Mooncake", hint="register_kv_caches runs once")
        self._kv_addrs = self._register(kv_caches)

    def _register(self, tensors: list[torch.Tensor]) -> list[int]:
        for t in tensors:
            if not t.is_contiguous():
                raise KVTransferError("a KV cache tensor is not contiguous", hint="allocate it with torch.empty")
        self.mem_type = "DRAM" if tensors[0].device.type == "cpu" else "VRAM"
        self.device_id = max(tensors[0].get_device(), 0)
        location = "*" if tensors[0].device.type == "cpu" else f"cuda:{self.device_id}"
        done: list[int] = []
        try:
            for t in tensors:
                self.engine.register(t.data_ptr(), t.numel() * t.element_size(), location)
                done.append(t.data_ptr())
        except BaseException:
            # Nobody else knows these addresses: left registered, they outlive the memory (freed by the
            # failed start, or by a sleep when a wake's registration failed) until the engine closes.
            for address in done:
                self.engine.unregister(address)
            raise
        return done

    def deregister(self) -> None:
        """Deregister what `register` registered (before that memory is freed: sleep)."""
        for address in self._kv_addrs:
            self.engine.unregister(address)
        self._kv_addrs = []

    def reregister(self, kv_caches: list[torch.Tensor]) -> None:
        self.deregister()
        self.register(kv_caches)

    def register_extra(self, tensors: list[torch.Tensor]) -> None:
        if not self._kv_addrs:
            raise KVTransferError("register the KV caches before extra buffers")
        self._register(tensors)

    # -- peers --------------------------------------------------------------------------------
    def metadata(self) -> bytes:
        ours = {"name": self.name, "session": self.engine.session_id, "protocol": self.engine.protocol}
        return PeerMetadata.model_validate(ours).model_dump_json().encode()

    def connection_metadata(self) -> bytes:
        """Mooncake's metadata holds no memory keys: the same as `metadata`."""
        return self.metadata()

    def add_remote(self, metadata: bytes) -> str:
        try:
            peer = PeerMetadata.model_validate_json(metadata)
        except ValidationError as e:
            raise KVTransferError(f"the peer's Mooncake metadata is not valid: {e.errors()[0]['msg']}",
                                  hint="peers must run the same pdlaunch version") from None
        if peer.protocol != self.engine.protocol:
            raise KVTransferError(
                f"Mooncake peer {peer.name} (session {peer.session}) moves KV over {peer.protocol} and this engine "
                f"over {self.engine.protocol}: Mooncake cannot transfer between the two",
                field="kv_transfer.mooncake_protocol",
                hint="mooncake_protocol auto picks rdma on hosts that list an RDMA device (/sys/class/infiniband) "
                "and tcp elsewhere: set it to tcp, or to rdma with an RDMA device on every node")
        self._remotes[peer.name] = peer.session
        return peer.name

    def forget_remote(self, name: str) -> None:
        self._remotes.pop(name, None)

    def _session(self, name: str) -> str:
        session = self._remotes.get(name)
        if session is None:
            raise KVTransferError(f"Mooncake peer {name} is not known here (no handshake yet, or it was forgotten)")
        return session

    # -- transfers and notifications ----------------------------------------------------------
    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> MooncakeXfer:
        """Post op ("READ": remote -> local, "WRITE": local -> remote); `notif` goes to the peer after it."""
        session = self._session(remote_agent)

        def run() -> None:
            self.engine.transfer(op, session, local, remote)
            if notif and op == "READ":
                # read_done: queued now that the bytes are in, not awaited: the READ counts whatever becomes of
                # it (logged when lost), and a prefill that does not answer would hold it up for a minute.
                try:
                    self._queue(remote_agent, session, notif)
                except KVTransferError as e:  # the agent is closing: its bytes are in all the same
                    logger.warning("Mooncake read_done notification to %s (session %s) not sent: %s; %s",
                                   remote_agent, session, e.render(), LOST_NOTIFICATION["read_done"])
            elif notif:  # push_done: the decode learns of the WRITE only through it, so the WRITE fails with it
                self._push_done(remote_agent, session, self._sign(notif))

        num_bytes = sum(n for _, n in local)
        return self.pool.post(run, num_bytes, f"{op} with {remote_agent}", wait_on_release=op == "WRITE")

    def _push_done(self, remote_agent: str, session: str, signed: str) -> None:
        """A WRITE's thread, its bytes landed: send its push_done, once more when the first send fails (the
        WRITE fails when both do, and the prefill then tells the decode push_failed: its request fails)."""
        try:
            self.engine.notify(session, self.name, signed)
        except Exception as e:  # noqa: BLE001 - any failure: the second send raises its own
            why = e.render() if isinstance(e, KVTransferError) else f"{type(e).__name__}: {e}"
            logger.warning("Mooncake push_done notification to %s (session %s) not delivered: %s; sending it again",
                           remote_agent, session, why)
            self.engine.notify(session, self.name, signed)

    def notify(self, remote_agent: str, message: bytes) -> None:
        """Queue `message` for the peer (best effort, like a NIXL notification): a failure to deliver it is
        logged with the peer, the kind and what its loss costs (LOST_NOTIFICATION), never raised."""
        self._queue(remote_agent, self._session(remote_agent), message)

    def push_done(self, remote_agent: str, message: bytes) -> None:
        """The push_done of a push of no block (prefill/push_sender.py): the push itself, so it is sent from the
        caller's thread as a WRITE's is, twice at most, and raises when both sends fail."""
        self._push_done(remote_agent, self._session(remote_agent), self._sign(message))

    def _queue(self, remote_agent: str, session: str, message: bytes) -> None:
        signed = self._sign(message)
        self._notifier.submit(session, lambda: self._send(remote_agent, session, signed, message))

    def _send(self, remote_agent: str, session: str, signed: str, message: bytes) -> None:
        """Notifier thread: one notification; whatever fails is
        logged with what its loss costs the peer."""
        try:
            self.engine.notify(session, self.name, signed)
        except Exception as e:  # noqa: BLE001 - any failure loses the notification: say so
            notif = parse_notification(message)
            kind = notif.kind if notif is not None else "malformed"
            expected = isinstance(e, KVTransferError)
            why = e.render() if isinstance(e, KVTransferError) else f"{type(e).__name__}: {e}"
            logger.log(logging.WARNING if expected else logging.ERROR,
                       "Mooncake %s notification to %s (session %s) not delivered: %s; %s", kind, remote_agent,
                       session, why, LOST_NOTIFICATION.get(kind, "the peer ignores it"), exc_info=not expected)

    def _sign(self, message: bytes) -> str:
        return mac(self._key, message).hex() + message.decode()

    def new_notifs(self) -> list[bytes]:
        """Notifications with a valid MAC (payload only); others are dropped with a rate-limited warning."""
        out: list[bytes] = []
        for sender, text in self.engine.notifications():
            payload = text[_MAC_HEX:].encode("utf-8", "replace")
            try:
                tag = bytes.fromhex(text[:_MAC_HEX])
            except ValueError:
                tag = b""
            if len(text) > MAX_NOTIFY_CHARS or len(tag) != _MAC_HEX // 2 or not mac_ok(self._key, payload, tag):
                self._bad.warn("notify", "dropped a Mooncake notification without a valid MAC (claimed sender "
                               "%r, %d chars)", sender[:100], len(text))
                continue
            out.append(payload)
        return out

    def close(self) -> None:
        self._notifier.shutdown()
        self.pool.shutdown()
        self._remotes.clear()
        self.engine.close()

