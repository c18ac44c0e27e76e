"""What every load strategy of the decode side shares, built once per decode side (the connector
makes it): the agent, the prefill side channels, the loader threads, a load's remaining time, the
staging buffer, the lock that guards every Load's fields, and the calls to the prefill side that
more than one strategy makes (ask for a push, cancel it, release the prefill's blocks; the READs, claim a
hold and READ a chunk through the prefill's staging or from its blocks, are its base's: reads.py);
staged pushes wait for their chunks in chunk_waits.py, and answer_checks.py checks what a prefill answered.
The strategies (pull.py, push.py, staged.py, reshard_load.py) import these modules and load.py, never each
other.

Notifications to the prefill (read_done once a load's bytes are in, release when it gave up) are best
effort, and `notify_prefill` is their one sender: they only let the prefill free a hold before its lease
(or our READ claim's cap) ends, so a send that fails at once (a Mooncake peer no longer known, a NIXL send
that raises) is logged once with the peer, the kind and what its loss costs (notifications.LOST_NOTIFICATION),
and the load goes on: one whose bytes landed completes. A release to a prefill rank the load has not shaken
hands with goes on the side channel instead (`send_release`), as best effort, as do push cancels (`cancel_push`):
on the release threads (`release_soon`, `HoldReleases`), never a loader thread. What must reach the prefill for
the bytes to move at all (a claim, a staging request, a push request: its delivery IS the transfer) goes on the
side channel and fails the load when it fails.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.auth import SideChannelKeys
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.blocks import coalesce
from pdlaunch.kv_transfer.decode.chunk_waits import ChunkWaits
from pdlaunch.kv_transfer.decode.compute_order import wait_compute
from pdlaunch.kv_transfer.decode.load import Load
from pdlaunch.kv_transfer.decode.peers import PeerCache
from pdlaunch.kv_transfer.decode.reads import LoadReads
from pdlaunch.kv_transfer.messages import (
    CancelPushAnswer,
    CancelPushRequest,
    Empty,
    PushRequest,
    ReleaseRequest,
    SideChannelRequest,
)
from pdlaunch.kv_transfer.notifications import LOST_NOTIFICATION, ReadDone, encode_notification
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.side_channel import client
from pdlaunch.kv_transfer.side_channel.client import Connections, Reply
from pdlaunch.kv_transfer.staging import StagingArea
from pdlaunch.kv_transfer.transport import TransferAgent
from pdlaunch.memory import platform

logger = logging.getLogger(__name__)

# Strategies that enforce the deadline in their loader thread (staged, reshard): seconds past it
# before the engine thread fails a running load itself (covers a stuck thread).
LOADER_DEADLINE_GRACE_SECONDS = 5.0
# How long a hold release or push cancel sent on the side channel waits for the prefill (`send_release`,
# `cancel_push`, and decode/loads.py `drop_unstarted`). Best effort: often sent after a handshake that got no answer,
# and the prefill's lease frees the blocks anyway (a drain its cancel would end early ends at its deadline).
RELEASE_TIMEOUT_SECONDS = 2.0


# Hold releases and push cancels on the side channel (`LoadContext.release_soon`: release_unloaded, start_load's
# params it cannot plan, a loader's load that ended before its strategy was on it, a resharding load's release of a
# rank it did not shake hands with, a push's cancel) run on threads of their own (`HoldReleases`), never on the
# loader threads: each may wait RELEASE_TIMEOUT_SECONDS per prefill rank, and queued there, many against a hung
# prefill delayed real loads past their deadlines. At most this many wait for a thread; past it, one is dropped
# (the prefill's lease frees the blocks).
RELEASE_THREADS = 2
MAX_PENDING_RELEASES = 256
# At a decode's shutdown the queued releases (among them those of the loads it aborts: loads.py `shutdown`) are still
# sent for at most this long in all, then the rest are dropped (logged): a hung prefill must not hold the shutdown.
SHUTDOWN_DRAIN_SECONDS = min(2.0, RELEASE_TIMEOUT_SECONDS)

# What a queued side-channel message is, by what its loss costs: "release", a prefill's hold it ends (lost, the
# prefill keeps the request's blocks until its hold's lease ends; a cancel of a push never sent is one); "cancel", a
# sent push's cancel (table.py `_start_drain`: lost, the decode's own blocks stay draining until drain_until).
ReleaseKind = Literal["release", "cancel"]
DROPPED = {
    "release": "hold release not sent: %d releases already wait for prefills that answer slowly or not at all (%d "
               "dropped so far); the prefill keeps the request's blocks until its hold's lease ends "
               "(kv_transfer.kv_lease_seconds)",
    "cancel": "push cancel not sent: %d releases already wait for prefills that answer slowly or not at all (%d "
              "dropped so far); this decode's blocks the push writes stay draining until the load's deadline "
              "(kv_transfer.transfer_timeout_seconds) plus the WRITE's wait and the drain's grace",
}


class HoldReleases:
    """Best-effort hold releases, on RELEASE_THREADS threads of their own, at most MAX_PENDING_RELEASES pending
    (queued or sending): past that cap, one is dropped with a log line counting the drops; at shutdown, the queued
    ones are sent for at most SHUTDOWN_DRAIN_SECONDS in all, and those left are dropped (logged). A prefill not told
    keeps the blocks until its hold's lease ends."""

    def __init__(self, threads: int = RELEASE_THREADS, cap: int = MAX_PENDING_RELEASES) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pdlaunch-kv-release")
        self.cap = cap
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified as each send ends
        self.pending = 0  # queued or sending
        self.sending = 0
        self.dropped = 0  # past the cap, since the start
        self.stopping = False  # shutdown began: nothing more is taken (the queued ones are still sent a while)
        self.closed = False  # shut down: nothing more is sent

    def submit(self, request_id: str, send: Callable[[], None], kind: ReleaseKind = "release") -> bool:
        """Queue `send` (the release of request `request_id`'s hold, or its sent push's cancel: `kind`); False when
        it was dropped."""
        with self._lock:
            if self.stopping:
                return False
            full = self.pending >= self.cap
            if full:
                self.dropped += 1
                dropped = self.dropped
            else:
                self.pending += 1
        if full:
            if dropped == 1 or dropped % 100 == 0:  # one line per 100 drops: a hung prefill's flood stays readable
                logger.warning("request %s: " + DROPPED[kind], request_id, self.cap, dropped)
            return False
        try:
            self._pool.submit(self._send, send)
        except RuntimeError:  # shut down since the check above: dropped, as a queued one
            with self._lock:
                self.pending -= 1
            return False
        return True

    def _send(self, send: Callable[[], None]) -> None:
        with self._lock:
            if self.closed:  # queued when shutdown began: dropped (counted there)
                return
            self.sending += 1
        try:
            send()
        except Exception:  # a bug: the sends log what they expect themselves; a pool's future would swallow it
            logger.exception("hold release failed; the prefill's lease frees the blocks")
        finally:
            with self._lock:
                self.sending -= 1
                self.pending -= 1
                self._idle.notify_all()

    def shutdown(self, drain_seconds: float = SHUTDOWN_DRAIN_SECONDS) -> None:
        """Take no more releases; send the queued ones for at most `drain_seconds` in all (a decode's own shutdown
        queues its aborted loads' releases), then drop those still queued (logged: their leases free the blocks) and
        wait for those being sent (each within RELEASE_TIMEOUT_SECONDS per prefill rank)."""
        deadline = time.monotonic() + drain_seconds
        with self._lock:
            self.stopping = True
            while self.pending and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            self.closed = True
            queued = self.pending - self.sending
        if queued:
            logger.info("%d hold release(s) not sent at shutdown (%gs spent sending the queued ones); their prefills "
                        "free the blocks when the holds' leases end (kv_transfer.kv_lease_seconds)", queued,
                        drain_seconds)
        self._pool.shutdown(wait=True, cancel_futures=True)


def loader_pool(device_index: int, workers: int = 4) -> ThreadPoolExecutor:
    """The loader threads; each binds the instance's device when it starts (they copy KV: vLLM #39548)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pdlaunch-kv-loader",
                              initializer=platform.set_device, initargs=(device_index,))


@dataclass
class LoadContext(LoadReads):
    agent: TransferAgent
    spec: Callable[[], KVCacheSpec]
    peers: PeerCache
    keys: SideChannelKeys
    handshake_timeout: float
    transfer_timeout: float
    verify_kv: bool
    executor: ThreadPoolExecutor  # the loader threads (loader_pool: they bind the instance's device)
    # This decode's engine id: with the load's id (Load.load_id) it names our claims and read_done/release
    # notifications, which the prefill counts per (reader, load) (prefill/hold.py).
    reader: str
    staging: StagingArea | None = None  # this side's staging buffer (staging.py), None: direct
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Side-channel connections kept open between requests (push, claim_read, cancel_push, ...): a fresh
    # connection per request cost ~0.4 ms of every load's latency (TCP connect + a server thread).
    connections: Connections = field(default_factory=Connections)
    chunks: ChunkWaits = field(default_factory=ChunkWaits)  # staged pushes waiting for a chunk's notification
    releases: HoldReleases = field(default_factory=HoldReleases)  # side-channel releases and cancels (release_soon)

    def remaining(self, load: Load, what: str) -> float:
        """Seconds left before the load's deadline; KVTransferError when none are left or it was aborted."""
        remaining = load.deadline - time.monotonic()
        if remaining <= 0 or load.abandoned:
            raise KVTransferError(
                f"KV of request {load.request_id} did not arrive within {self.transfer_timeout:g}s "
                f"({load.mode} from {load.where}, stage: {what})" if remaining <= 0 else "aborted",
                field="kv_transfer.transfer_timeout_seconds",
            )
        return remaining

    def ask(self, remote: RemoteKV, message: SideChannelRequest, reply: type[Reply], timeout: float,
            what: str, stopped: Callable[[], bool] | None = None) -> Reply:
        """One side-channel request to the prefill rank `remote` names; `stopped` (e.g. Load.stopped): asked while it
        waits for the answer, True gives up (client.PendingCall)."""
        return client.request(remote.host, remote.port, message, reply, timeout, f"{what} to {remote.where}",
                              self.keys, self.connections, stopped)

    def release_soon(self, load: Load, send: Callable[[], None], kind: ReleaseKind = "release") -> None:
        """Run `send` (a side-channel hold release or push cancel of `load`) on the release threads, never on the
        calling loader thread: against a prefill that does not answer, it waits RELEASE_TIMEOUT_SECONDS per rank,
        and the loader threads are the real loads'. Dropped (logged) past MAX_PENDING_RELEASES pending, or at
        shutdown: the prefill's lease frees the blocks, or, for a sent push's cancel (`kind` "cancel"), the drain's
        end frees this decode's."""
        self.releases.submit(load.request_id, send, kind)

    def notify_prefill(self, agent_name: str, notif: ReadDone, request_id: str) -> None:
        """Send read_done/release to the prefill agent `agent_name`, best effort (module docstring): a send
        that fails is logged, never raised."""
        try:
            self.agent.notify(agent_name, encode_notification(notif))
        except Exception as e:  # noqa: BLE001 - a NIXL error type per backend; Mooncake: KVTransferError
            why = e.render() if isinstance(e, KVTransferError) else f"{type(e).__name__}: {e}"
            logger.warning("request %s: %s notification to prefill agent %s not sent: %s; %s", request_id,
                           notif.kind, agent_name, why, LOST_NOTIFICATION[notif.kind])

    def release_prefill(self, load: Load) -> None:
        """A load that READ (or would have READ) the prefill's blocks failed or was aborted: send "release"
        (best effort: the prefill's lease frees them anyway)."""
        if load.remote_agent is not None:
            self.notify_prefill(load.remote_agent, ReadDone(kind="release", request_id=load.remote.held_request_id,
                                                            reader=self.reader, load=load.load_id), load.request_id)

    def send_release(self, load: Load, remote: RemoteKV, readers: int = 1) -> None:
        """Send the prefill rank `remote` names "release" on its side channel (ReleaseRequest), for a rank this
        load has not shaken hands with: it has no NIXL agent of that rank to notify, and shaking hands only for
        this would wait up to the handshake timeout on a rank whose handshake may just have gone unanswered. The
        side channel authenticates it with the deployment secret, as every request there. Best effort, within
        RELEASE_TIMEOUT_SECONDS: a rank not told is logged, and its hold's lease frees the blocks.

        Only for a request the prefill named in signed params (with its blocks): an unsigned push proxy's request
        id is the client's word until the prefill confirmed it (decode/loads.py `drop_unstarted`), and releasing
        it could free another client's hold."""
        if not load.remote.request_id or load.remote.block_ids is None:
            return
        message = ReleaseRequest(type="release", request_id=load.remote.held_request_id, reader=self.reader,
                                 load=load.load_id, readers=readers, nonce=uuid.uuid4().hex)
        what = "hold release" if remote.tp_rank is None else f"hold release of TP rank {remote.tp_rank}"
        try:
            self.ask(remote, message, Empty, min(RELEASE_TIMEOUT_SECONDS, self.handshake_timeout), what)
        except KVTransferError as e:
            logger.warning("request %s: %s; %s", load.request_id, e.render(), LOST_NOTIFICATION["release"])

    # -- pushes (push, staged push) ---------------------------------------------------------------
    def request_push(self, load: Load, bases: list[int], pairs: list[list[tuple[int, int]]], spec: KVCacheSpec,
                     last: bool, wait: bool = False, release: Callable[[], None] | None = None, *,
                     into_blocks: bool = True) -> None:
        """Ask the prefill side to WRITE pairs [(my_id, its_block), ...] per group into `bases` (my blocks,
        `into_blocks`: after wait_compute; or staging slots). wait=True: block until its notification (staged
        chunks), else the engine thread sees it in poll. `release` (wait=True) frees the staging slots `bases`
        name when this raises: at once when no WRITE can land in them, else once the chunk ended
        (ChunkWaits.give_up)."""
        nonce = load.nonce
        event: tuple[threading.Event, list[str]] | None = None
        try:
            if into_blocks:
                wait_compute(load, self.remaining)
            remaining = self.remaining(load, "push request")
            with self.lock:
                if load.abandoned or load.state.ended:
                    raise KVTransferError(f"push of request {load.request_id} not sent: {load.error or 'aborted'}")
                if wait:
                    nonce, done, errors = self.chunks.open(load.nonce, lambda: self._write_ended(load))
                    event = (done, errors)
                # From here on prefill may WRITE into our blocks (or slots): abort/fail drain until it says it ended.
                load.push_sent, load.write_ended = True, False
                if load.posted is None:  # the prefill posts its WRITE on receipt: the data movement starts
                    load.posted = time.monotonic()
        except BaseException:
            if release is not None:
                release()
            raise
        runs = [[(r.local_start, r.remote_start, r.count) for r in coalesce(group)] for group in pairs]
        message = PushRequest(
            type="push", request_id=load.remote.held_request_id, nonce=nonce, owner=load.nonce, last=last,
            reader=self.reader, agent_name=self.agent.name, agent_metadata=self.agent.metadata().hex(), runs=runs,
            base_addrs=bases, block_bytes=spec.block_bytes, device_id=self.agent.device_id,
            deadline_in=remaining,  # prefill posts no WRITE after this (seconds from receipt)
        )
        try:
            self.ask(load.remote, message, Empty, remaining, "push request")
            if event is not None:
                if not event[0].wait(self.remaining(load, "push")):
                    self.remaining(load, "push")  # raises the timeout
                if event[1]:
                    raise KVTransferError(event[1][0])
        except BaseException:
            # A WRITE posted just before our deadline (or a request whose answer was lost) may still land:
            # the slots stay taken until the chunk's notification or the drain's end says none will.
            if release is not None and not (event is not None and self.chunks.give_up(nonce, release)):
                release()
            raise

    def _write_ended(self, load: Load) -> None:
        with self.lock:
            load.write_ended = True

    def cancel_unsent_push(self, load: Load) -> None:
        if not load.push_sent:  # never asked: the prefill may free it now
            self.release_soon(load, lambda: self.cancel_push(load))

    def cancel_push(self, load: Load) -> None:
        """Release thread (`release_soon`): ask prefill to drop the push; no WRITE in flight ends the drain at once.
        Within RELEASE_TIMEOUT_SECONDS: the prefill answers at once, and one that does not leaves the drain to end
        by notification or at drain_until."""
        message = CancelPushRequest(type="cancel_push", request_id=load.remote.held_request_id, owner=load.nonce)
        timeout = min(RELEASE_TIMEOUT_SECONDS, self.handshake_timeout)
        try:
            answer = self.ask(load.remote, message, CancelPushAnswer, timeout, "push cancel")
        except KVTransferError as e:  # the drain then ends by notification or at drain_until
            logger.warning("request %s: %s", load.request_id, e)
            return
        if not answer.in_flight:
            with self.lock:
                load.write_ended = True
