"""Prefill side of the NIXL connector: held requests, leases, and the push sender pool.

A request that finished prefill with do_remote_decode keeps its blocks ("hold") until
- pull: the decode agent's READ completes and its notification ("read_done") arrives (from each of
  the `readers` decode ranks the notification names, when decode reshards between TP sizes), or
- push: a sender thread WROTE the blocks into decode's blocks and notified decode, or
- decode says it gave up ("release"), or
- the lease (kv_transfer.kv_lease_seconds) expires: decode died or the client went away.
Pull: decode claims the hold ("claim_read" on the side channel) before it READs; a claimed hold
lives until the read_done/release notification or a hard cap (decode's remaining transfer time plus
READ_GRACE_SECONDS), whichever comes first, even past its lease: its blocks are never reused mid-read.
Push: a WRITE is never posted after decode's deadline (its remaining time travels with the push
request) nor after decode cancelled it ("cancel_push"); an in-flight WRITE is waited for (bounded)
and then push_done/push_failed tells decode that nothing more lands in its blocks.
Each of these reports the request in `finished_sending` exactly once, so the engine frees it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.agent import KVAgent, XferHandle, encode_notif
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.blocks import coalesce, run_descriptors
from pdlaunch.kv_transfer.push_params import client_request_id
from pdlaunch.kv_transfer.staging import StagingArea
from pdlaunch.memory import platform
from pdlaunch.metrics import KV_EXPIRED_REQUESTS

logger = logging.getLogger(__name__)

# NIXL's UCX backend sends a WRITE's notification (push_done) only from check_xfer_state, once that call
# sees the WRITE complete: the time between two checks adds straight to decode's wait. The check interval
# grows with the time the WRITE has run (1/16 of it, within [_MIN_CHECK_SECONDS, _MAX_CHECK_SECONDS]), so
# a WRITE is seen done at most ~6% (or 0.25 ms) after it ended, with a few dozen checks per WRITE. A fixed
# 0.5 ms sleep cost ~0.3 ms on average per push; spinning instead fought NIXL's own progress thread for
# the UCX worker (measured on CPU: WRITE and notify both slower).
_MIN_CHECK_SECONDS = 0.00002
_MAX_CHECK_SECONDS = 0.00025
# A claimed READ may outlive decode's deadline by this much (message latency, a READ completing as
# decode gives up); decode accepts a READ only when it saw it done before its own deadline.
READ_GRACE_SECONDS = 5.0


@dataclass
class Hold:
    request_id: str
    block_ids: list[list[int]]
    deadline: float  # time.monotonic() when the lease expires
    busy: int = 0  # pushes/stagings reading these blocks now: neither expire nor free them yet
    done: bool = False  # may be freed
    notified: int = 0  # read_done/release notifications received
    readers: int = 1  # notifications to wait for (the largest `readers` a notification named)
    expired: bool = False
    cancelled: bool = False  # decode gave up a push: post no WRITE for it any more
    read_claimed: bool = False  # a decode READ runs: the deadline is the read's hard cap, not the lease
    prompt_digest: str | None = None  # push_params.prompt_digest of its prompt ("held_blocks" matches it)


@dataclass
class PushTiming:
    """Where one push spent its time; time.monotonic() values (comparable across processes of one host)."""

    request_id: str
    num_bytes: int
    received: float  # the push request arrived on the side channel
    posting: float  # descriptors built, about to post the WRITE
    posted: float  # NIXL's post returned (on CPU DRAM, UCX copies within the post)
    done: float  # a check saw the WRITE complete (NIXL sent push_done then)


@dataclass
class Ticket:
    """Staging slots holding a copy of some held blocks until decode has read them ("unstage")."""

    slots: list[int]
    deadline: float
    request_id: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


class PrefillSide:
    """Owns the holds; `poll` is called from the engine thread, `handle_push` from side-channel threads."""

    def __init__(
        self, agent: KVAgent, lease_seconds: float, transfer_timeout: float, device_index: int, workers: int = 2
    ) -> None:
        self.agent = agent
        self.lease_seconds = lease_seconds
        self.transfer_timeout = transfer_timeout
        self.device_index = device_index
        self.spec: KVCacheSpec | None = None
        self.staging: StagingArea | None = None
        self._holds: dict[str, Hold] = {}
        self._tickets: dict[str, Ticket] = {}
        self._peers: dict[str, tuple[str, str]] = {}  # decode agent name -> (loaded name, its metadata hex)
        # Decode agents that READ from us (pull) and gave their connection info only, so that a sleep
        # can reach them: name -> loaded name.
        self._listeners: dict[str, str] = {}
        self._timings: deque[PushTiming] = deque(maxlen=256)
        self._lock = threading.Lock()
        # Seed 000: CUDA's current device is per thread; bind it once when each sender thread starts.
        self.executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="pdlaunch-kv-sender", initializer=self._bind_sender_thread_device
        )

    def _bind_sender_thread_device(self) -> None:
        platform.set_device(self.device_index)

    # -- engine thread ------------------------------------------------------------------------
    def hold(self, request_id: str, block_ids: list[list[int]], prompt_digest: str | None = None) -> None:
        with self._lock:
            self._holds[request_id] = Hold(request_id, [list(b) for b in block_ids],
                                           time.monotonic() + self.lease_seconds, prompt_digest=prompt_digest)

    def on_notif(self, notif: dict[str, Any]) -> None:
        """A decode agent finished reading (read_done) or gave up (release) on a request."""
        request_id = str(notif.get("request_id"))
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is not None:
                hold.notified += 1
                hold.readers = max(hold.readers, int(notif.get("readers", 1)))
                hold.done = hold.done or hold.notified >= hold.readers
        if hold is None:
            logger.warning("KV %s notification for request %s, which is not held (lease expired?)",
                           notif.get("kind"), request_id)

    def release(self, request_id: str) -> bool:
        """The decode leg of `request_id` will not run: free the hold at the next `poll`, or once a push
        or staging copy reading it ends (no new one starts: cancelled). A hold a decode READ claimed
        stays until that READ's notification or cap."""
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None or hold.read_claimed:
                return False
            hold.cancelled = hold.done = True
        logger.info("KV of request %s released early: its decode leg will not run", request_id)
        return True

    def poll(self, now: float) -> set[str]:
        """Requests whose blocks may be freed now; counts lease expiries."""
        finished: set[str] = set()
        with self._lock:
            for hold in list(self._holds.values()):
                if not hold.done and not hold.busy and now > hold.deadline:
                    hold.done = hold.expired = True
                    if hold.read_claimed:
                        logger.warning("decode's READ of request %s did not end by its hard cap", hold.request_id)
                if hold.done and not hold.busy:
                    finished.add(hold.request_id)
                    del self._holds[hold.request_id]
                    if hold.expired:
                        KV_EXPIRED_REQUESTS.inc()
                        logger.warning("KV of request %s was not fetched within the %.1fs lease: freed",
                                       hold.request_id, self.lease_seconds)
            stale = [t for t in self._tickets.values() if now > t.deadline]
            for ticket in stale:
                del self._tickets[ticket.id]
        for ticket in stale:  # decode never said it read them (died, timed out)
            logger.warning("staging slots of request %s were not unstaged in time: released", ticket.request_id)
            assert self.staging is not None
            self.staging.release(ticket.slots)
        return finished

    def num_held(self) -> int:
        with self._lock:
            return len(self._holds)

    def push_timings(self) -> list[PushTiming]:
        """The phases of the last (at most 256) pushes that completed, oldest first."""
        with self._lock:
            return list(self._timings)

    # -- side-channel threads -----------------------------------------------------------------
    def handle_claim_read(self, message: dict[str, Any]) -> dict[str, Any]:
        """Decode is about to READ the blocks of a held request: keep them past the lease until its
        read_done/release notification, at most `seconds` (decode's remaining time, clamped to the lease:
        a peer cannot pin blocks longer than an unread hold lives) + READ_GRACE_SECONDS."""
        request_id = str(message["request_id"])
        seconds = float(message["seconds"])
        if not 0.0 <= seconds < float("inf"):  # messages.py refuses these already; the clamp must hold alone
            raise KVTransferError(f"claim of {seconds!r} seconds", field="claim_read.seconds")
        cap = time.monotonic() + min(seconds, self.lease_seconds) + READ_GRACE_SECONDS
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None or hold.done or hold.cancelled:
                raise KVTransferError(
                    f"request {request_id} is not held here any more: its lease ({self.lease_seconds:g}s) expired "
                    "or its KV was already sent", field="kv_transfer.kv_lease_seconds",
                    hint="raise the lease if decode queues requests longer than that")
            hold.read_claimed = True
            hold.deadline = max(hold.deadline, cap)
        return {}

    def handle_cancel_push(self, message: dict[str, Any]) -> dict[str, Any]:
        """Decode gave up a push (abort, timeout). Answers in_flight: whether a WRITE may still land in
        its blocks; if so, the sender thread's push_done/push_failed notification says when it ended."""
        with self._lock:
            hold = self._holds.get(str(message["request_id"]))
            if hold is None:
                return {"in_flight": False}
            hold.cancelled = True
            in_flight = bool(hold.busy)
            if not in_flight:
                hold.done = True
        return {"in_flight": in_flight}

    def handle_push(self, message: dict[str, Any]) -> dict[str, Any]:
        """Decode asks: WRITE held blocks into its blocks (or staging slots), then notify it with `nonce`.

        message["pairs"][g] = [[decode_id, prefill_block_id], ...]; "last" marks the final chunk of
        the request (the hold is freed after it).
        """
        request_id = str(message["request_id"])
        received = time.monotonic()
        hold = self._claim(request_id, message["pairs"], message["block_bytes"], exclusive=True)
        try:
            peer = self._peer(message["agent_name"], message["agent_metadata"])
            self.executor.submit(self._push, hold, message, peer, received)
        except Exception:
            with self._lock:
                hold.busy -= 1
            raise
        return {}

    def handle_held_blocks(self, message: dict[str, Any]) -> dict[str, Any]:
        """A decode holding push params without block ids (vLLM's push proxy) asks which blocks hold
        its request: found by request id, else by the client's X-Request-Id, and only when the held
        prompt's digest is the decode's (push_params.py). Waits for the hold up to `wait` seconds
        (capped by the transfer timeout): the decode leg may arrive before the prefill finished."""
        wanted, client_id = message.get("request_id"), str(message["client_request_id"])
        deadline = time.monotonic() + min(float(message["wait"]), self.transfer_timeout)
        while True:
            with self._lock:
                for hold in self._holds.values():
                    named = hold.request_id == wanted if wanted else client_request_id(hold.request_id) == client_id
                    if named and not (hold.done or hold.cancelled or hold.expired or hold.busy) \
                            and hold.prompt_digest == message["prompt_digest"]:
                        return {"request_id": hold.request_id, "block_ids": hold.block_ids}
            if time.monotonic() >= deadline:
                raise KVTransferError(
                    f"no request {wanted or f'with X-Request-Id {client_id}'} of this prompt is held here",
                    hint="its lease may have expired, or the decode got another prompt than the prefill")
            time.sleep(0.005)

    def handle_stage(self, message: dict[str, Any]) -> dict[str, Any]:
        """Copy held blocks into staging slots for a decode READ; the answer names the slots and a ticket."""
        if self.staging is None:
            raise KVTransferError("this prefill engine does not stage its KV cache")
        request_id = str(message["request_id"])
        blocks = message["blocks"]
        block_bytes = self.spec.block_bytes if self.spec else []
        hold = self._claim(request_id, [[[0, b] for b in ids] for ids in blocks], block_bytes)
        try:
            ticket = self.executor.submit(self._stage, request_id, blocks).result(timeout=self.transfer_timeout)
        finally:
            with self._lock:
                hold.busy -= 1
        return {"ticket": ticket.id, "slots": [ticket.slots[:len(ids)] for ids in blocks]}

    def handle_unstage(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            ticket = self._tickets.pop(str(message["ticket"]), None)
        if ticket is not None and self.staging is not None:
            self.staging.release(ticket.slots)
        return {}

    def _claim(self, request_id: str, pairs: list[list[list[int]]], block_bytes: list[int],
               exclusive: bool = False) -> Hold:
        """The hold of `request_id`, marked busy, after checking the request only names blocks it holds.
        exclusive: refuse while another claim is active (a push); stagings of several decode ranks
        reading one request (resharding) may overlap."""
        if self.spec is None:
            raise KVTransferError("this prefill engine has not registered its KV cache yet")
        if block_bytes != self.spec.block_bytes:
            raise KVTransferError(
                f"request {request_id}: decode blocks are {block_bytes} bytes, mine {self.spec.block_bytes}",
                hint="prefill and decode must run the same model, dtype, block size and TP size",
            )
        if len(pairs) != len(self.spec.kv_caches):
            raise KVTransferError(f"request {request_id}: {len(pairs)} KV-cache groups named, this engine has "
                                  f"{len(self.spec.kv_caches)}")
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None or hold.done or hold.cancelled:
                raise KVTransferError(
                    f"request {request_id} is not held here: its lease ({self.lease_seconds:g}s) expired "
                    "or its KV was already sent",
                    field="kv_transfer.kv_lease_seconds",
                    hint="raise the lease if decode queues requests longer than that",
                )
            if exclusive and hold.busy:
                raise KVTransferError(f"request {request_id} is already being sent")
            for g, group_pairs in enumerate(pairs):
                if not {p[1] for p in group_pairs} <= set(hold.block_ids[g]) - {-1}:
                    raise KVTransferError(f"request {request_id} names blocks of group {g} it does not hold")
            hold.busy += 1
        return hold

    def _peer(self, name: str, metadata_hex: str) -> str:
        """The decode agent `name` loaded with `metadata_hex`. A decode that woke up registered new memory
        (its staging buffer, or on CPU its KV tensors, moved): its push carries new metadata, which
        replaces the stale one. Under the lock: two pushes of a woken decode must not load it twice."""
        with self._lock:
            loaded = self._peers.get(name)
            if loaded is not None and loaded[1] == metadata_hex:
                return loaded[0]
            if loaded is not None:
                self.agent.forget_remote(loaded[0])
            listener = self._listeners.pop(name, None)
            if listener is not None:  # its connection info only: the full metadata replaces it
                self.agent.forget_remote(listener)
            self._peers[name] = (self.agent.add_remote(bytes.fromhex(metadata_hex)), metadata_hex)
            return self._peers[name][0]

    def staging_users(self) -> set[str]:
        """Request ids that may hold staging slots now: stagings not yet unstaged, and holds a push or
        staging copy is reading."""
        with self._lock:
            return ({t.request_id for t in self._tickets.values()}
                    | {h.request_id for h in self._holds.values() if h.busy})

    def tell_decodes_to_forget(self, kv_epoch: int) -> None:
        """Before this prefill frees the memory it registered (sleep): ask every decode it pushed to
        or that reads from it, by NIXL notification, to drop this agent's metadata of `kv_epoch`
        (their mapping of that memory goes with it). A decode that cannot be reached is logged and
        skipped."""
        with self._lock:
            loaded = [name for name, _ in self._peers.values()] + list(self._listeners.values())
        message = encode_notif("forget", agent_name=self.agent.name, kv_epoch=kv_epoch)
        for name in loaded:
            try:
                self.agent.notify(name, message)
            except Exception as exc:  # noqa: BLE001 (a NIXL error type per backend): sleep goes on
                logger.warning("could not ask decode agent %s to forget this prefill before sleep: %s", name, exc)

    def handle_listen(self, message: dict[str, Any]) -> dict[str, Any]:
        """A decode that READs from us (pull) gives its connection info, so that `tell_decodes_to_forget`
        can reach it; we never load its memory's metadata in pull mode."""
        name = str(message["agent_name"])
        with self._lock:
            if name not in self._peers and name not in self._listeners:
                self._listeners[name] = self.agent.add_remote(bytes.fromhex(str(message["agent_metadata"])))
        return {"listening": True}

    def handle_forget(self, message: dict[str, Any]) -> dict[str, Any]:
        """A decode agent is about to free the memory it registered (sleep): drop its metadata, so
        that UCX closes the mappings it opened of that memory (a mapped buffer stays allocated)."""
        name = str(message["agent_name"])
        with self._lock:
            loaded = self._peers.pop(name, None)
            if loaded is not None:
                self.agent.forget_remote(loaded[0])
        return {"forgot": loaded is not None}

    # -- sender threads -----------------------------------------------------------------------
    def _stage(self, request_id: str, blocks: list[list[int]]) -> Ticket:
        assert self.staging is not None and self.spec is not None
        slots = self.staging.acquire(max(map(len, blocks), default=0), self.transfer_timeout)
        try:
            self.staging.gather(self.spec.kv_caches, blocks, slots)
        except Exception:
            self.staging.release(slots)
            raise
        ticket = Ticket(slots, time.monotonic() + self.transfer_timeout, request_id)
        with self._lock:
            self._tickets[ticket.id] = ticket
        return ticket

    def _push(self, hold: Hold, message: dict[str, Any], peer: str, received: float) -> None:
        assert self.spec is not None
        nonce = message["nonce"]
        # Never write after decode gave up: it frees its blocks soon after its own deadline.
        deadline = min(received + self.transfer_timeout, received + float(message.get("deadline_in", float("inf"))))
        xfer: XferHandle | None = None
        slots: list[int] = []
        failed = False
        try:
            pairs = message["pairs"]
            sources = [[p[1] for p in group] for group in pairs]
            bases = [t.data_ptr() for t in self.spec.kv_caches]
            if self.staging is not None:  # copy the blocks into plain memory first
                slots = self.staging.acquire(max(map(len, sources), default=0), self.transfer_timeout)
                self.staging.gather(self.spec.kv_caches, sources, slots)
                sources = [slots[:len(ids)] for ids in sources]
                bases = [b.data_ptr() for b in self.staging.buffers]
            local: list[tuple[int, int]] = []
            remote: list[tuple[int, int]] = []
            for g, group in enumerate(pairs):
                runs = coalesce((src, p[0]) for src, p in zip(sources[g], group))
                lo, re = run_descriptors(runs, bases[g], message["base_addrs"][g], self.spec.block_bytes[g])
                local += lo
                remote += re
            notif = encode_notif("push_done", nonce=nonce)
            if not local:
                self.agent.notify(peer, notif)
                return
            # A cancel that comes after this check answers in_flight (busy): decode then waits for our
            # push_done/push_failed, so posting without the lock is safe.
            if hold.cancelled or time.monotonic() >= deadline:
                raise KVTransferError(f"push of request {hold.request_id} cancelled: decode gave up on it")
            posting = time.monotonic()
            xfer = self.agent.transfer("WRITE", local, remote, peer, message["device_id"], notif)
            posted = time.monotonic()
            state = _wait_write(xfer, posted, deadline)
            if state == "DONE":
                with self._lock:
                    self._timings.append(PushTiming(hold.request_id, xfer.num_bytes, received, posting,
                                                    posted, time.monotonic()))
            if state != "DONE":
                raise KVTransferError(
                    f"WRITE of {xfer.num_bytes} bytes for request {hold.request_id} "
                    + ("failed in NIXL" if state == "ERR" else "did not finish before decode's deadline")
                )
        except Exception as e:
            failed = True  # decode fails the request: free the blocks now
            text = e.render() if isinstance(e, KVTransferError) else f"{type(e).__name__}: {e}"
            logger.error("push of request %s failed: %s", hold.request_id, text)
            if xfer is not None:  # cancel a WRITE still running before telling decode nothing more lands
                xfer.release()
                xfer = None
            try:
                self.agent.notify(peer, encode_notif("push_failed", nonce=nonce, error=text))
            except Exception as notify_error:  # decode then times out with its own message
                logger.warning("could not tell decode that the push failed: %s", notify_error)
        finally:
            if xfer is not None:
                xfer.release()
            if slots and self.staging is not None:
                self.staging.release(slots)
            with self._lock:
                hold.busy -= 1
                hold.done = hold.done or failed or bool(message.get("last", True))

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def _wait_write(xfer: XferHandle, posted: float, deadline: float) -> str:
    """The WRITE's final state ("DONE"/"ERR"), or "PROC" when `deadline` (time.monotonic()) came first."""
    while (state := xfer.state()) == "PROC":
        now = time.monotonic()
        if now >= deadline:
            break
        time.sleep(min(max((now - posted) / 16, _MIN_CHECK_SECONDS), _MAX_CHECK_SECONDS, deadline - now))
    return state
