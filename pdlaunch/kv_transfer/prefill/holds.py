"""The prefill side's table of held requests (`HoldTable`, by request id): holds, their leases, the claims
of decode READs (claim_read, or a staged pull's stage request), cancels and release notifications, and decode
engines that ended (`forget_engine`); the claims of the copies that read a hold's blocks (push WRITEs and
staging copies) are its base's (copy_claims.py). What one hold holds and when it ends: hold.py. How many
notifications a decode load sends (a resharding decode's ranks each send one): its decode's plan, reader_plans.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.auth import RateLimitedWarning
from pdlaunch.kv_transfer.messages import (
    CancelPushAnswer,
    CancelPushRequest,
    ClaimReadRequest,
    DropHeldRequest,
    Empty,
    ReleaseRequest,
)
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.prefill.copy_claims import CopyClaims
from pdlaunch.kv_transfer.prefill.dropped_asks import AskedFor, DroppedAsks, named
from pdlaunch.kv_transfer.prefill.hold import (
    MAX_LOADS_PER_HOLD,
    REFUSED_LOAD,
    Hold,
    Reader,
    cancel_push,
    claim_for_read,
    drop_engine,
    engine_ended,
    how_it_ended,
    not_held,
    read_running,
    reader_done,
    reader_name,
    readers_that_read,
    take_notification,
    takes,
    too_many_loads,
)
from pdlaunch.kv_transfer.prefill.reader_plans import Count, ReaderPlans
from pdlaunch.metrics.kv_transfer import KV_CLAIM_CAP_FREES, KV_EXPIRED_REQUESTS

logger = logging.getLogger(__name__)

# A claimed READ may outlive decode's deadline by this much (message latency, a READ completing as
# decode gives up); decode accepts a READ only when it saw it done before its own deadline.
READ_GRACE_SECONDS = 5.0


class HoldTable(CopyClaims):
    """Holds by request id; `poll` runs on the engine thread, claims on side-channel and sender threads."""

    def __init__(self, lease_seconds: float, plans: ReaderPlans | None = None) -> None:
        self.lease_seconds = lease_seconds
        self.plans = plans if plans is not None else ReaderPlans()  # decode layouts from their handshakes
        self._warn = RateLimitedWarning(logger)  # notifications whose `readers` the plan disowns: a peer's word
        self.lock = threading.Lock()
        self._unclaimed = threading.Condition(self.lock)  # a claim ended: an exclusive claim may go on
        self._holds: dict[str, Hold] = {}
        # Requests whose hold ended, kept a lease long: a claim sent with its READ may arrive after the read_done
        # (claim_read answers it as claimed), and a decode's release may come after the proxy's (logged as
        # expected, not as a lost hold). request id -> (when to forget it, the loads that read it, how it ended).
        self._ended: OrderedDict[str, tuple[float, frozenset[Reader], str]] = OrderedDict()
        self._pushes: OrderedDict[str, float] = OrderedDict()  # push nonces accepted (copy_claims.py)
        self._dropped = DroppedAsks(lease_seconds)  # loads that gave up asking "held_blocks" (drop_held)

    def hold(self, request_id: str, block_ids: list[list[int]], prompt_digest: str | None = None) -> None:
        now = time.monotonic()
        with self.lock:
            hold = self._holds[request_id] = Hold(request_id, [list(b) for b in block_ids], now + self.lease_seconds,
                                                  prompt_digest=prompt_digest)
            dropped_by = self._dropped.take(hold, now)
            if dropped_by is not None:
                cancel_push(hold, dropped_by)
        if dropped_by is not None:
            logger.info("KV of request %s released at once: the decode leg that asked for it gave up before it was "
                        "held", request_id)

    def asked(self, asked: AskedFor) -> None:
        """A decode asks "held_blocks" for `asked` (once per ask, as it comes): an ask for the same request that
        another load dropped is taken back (dropped_asks.py), so a retry of the same client request keeps its hold.
        Not in `find`, which the handler calls until the hold comes: an ask of the dropping load still waiting there
        would take its own drop back."""
        with self.lock:
            self._dropped.asked_again(asked)

    def drop_held(self, message: DropHeldRequest) -> Empty:
        """A decode load gave up asking "held_blocks" for a request (messages.py DropHeldRequest): its hold ends now
        if it is held (once no other decode is at it: hold.py `cancel_push`), else as it is made within the
        message's `seconds` (clamped to the lease; dropped_asks.py)."""
        asked: AskedFor = (message.request_id, message.client_request_id, message.prompt_digest)
        with self.lock:
            hold = next((h for h in self._holds.values() if h.servable and named(h, asked)), None)
            if hold is None:
                self._dropped.add(asked, message.owner, message.seconds, time.monotonic())
            else:
                cancel_push(hold, message.owner)
            freed = hold is not None and hold.done
        if hold is not None:
            logger.info("KV of request %s %s: the decode leg that asked for it gave up", hold.request_id,
                        "released" if freed else "kept for another decode at it")
        return Empty()

    def get(self, request_id: str) -> Hold | None:
        with self.lock:
            return self._holds.get(request_id)

    def find(self, request_id: str | None, client_id: str, digest: str) -> tuple[str, list[list[int]]] | None:
        """(request id, block ids) of a servable hold named `request_id`, else (None) of the request of the
        client's X-Request-Id `client_id`; only when its prompt's digest is `digest`."""
        with self.lock:
            for hold in self._holds.values():
                if named(hold, (request_id, client_id, digest)) and hold.servable and not (hold.expired or hold.busy):
                    return hold.request_id, [list(b) for b in hold.block_ids]
        return None

    def on_read_done(self, notif: ReadDone, nonce: str | None = None) -> None:
        """A decode agent finished reading (read_done) or gave up (release) on a request: the hold ends once
        that load's notifications are all in and no other load that took the hold is still at it (`through`:
        a claimed READ, a push between its chunks). `nonce`: a release sent on the side channel (`on_release`)
        names itself; one sent again after a lost answer counts once. The load's notifications are counted against
        its decode's plan (reader_plans.py), not the `readers` they name: one that disagrees is logged."""
        reader = (notif.reader, notif.load)
        refused = False
        count = Count(None)
        plan = self.plans.plan(notif.reader)  # outside the lock: a new layout's plan is worked out once, here
        with self.lock:
            hold = self._holds.get(notif.request_id)
            if hold is not None and (nonce is None or nonce not in hold.release_nonces.get(reader, ())):
                refused = not takes(hold, reader)
                count = self.plans.count(notif, plan, hold.readers.get(reader))
                if count.wait is not None and take_notification(hold, reader, notif.kind == "read_done", count.wait) \
                        and nonce is not None:
                    hold.release_nonces.setdefault(reader, set()).add(nonce)
            ended = None if hold is not None else self._ended.get(notif.request_id)
        if count.problem is not None and not refused:
            self._warn.warn("readers", "KV %s notification from %s for request %s names readers=%d, %s", notif.kind,
                            reader_name(reader), notif.request_id, notif.readers, count.problem)
        if refused:
            logger.warning("KV %s notification from %s for request %s not counted: %d loads took its hold already",
                           notif.kind, reader_name(reader), notif.request_id, MAX_LOADS_PER_HOLD)
        if ended is not None:  # e.g. the proxy released it (its client left), then the decode aborted its load
            logger.debug("KV %s notification from %s for request %s after its hold ended (%s)", notif.kind,
                         notif.reader, notif.request_id, ended[2])
        elif hold is None:
            logger.warning("KV %s notification from %s for request %s, which is not held here (its lease of %gs "
                           "expired long ago, or the prefill restarted)", notif.kind, notif.reader, notif.request_id,
                           self.lease_seconds)

    def on_release(self, message: ReleaseRequest) -> Empty:
        """A decode rank's release sent on the side channel (messages.py ReleaseRequest): it has no NIXL agent of
        ours to notify (it has not shaken hands with this rank). Counted as the release notification is; the side
        channel authenticated it with the deployment secret, as it does every request."""
        self.on_read_done(ReadDone(kind="release", request_id=message.request_id, reader=message.reader,
                                   load=message.load, readers=message.readers), message.nonce)
        return Empty()

    def release(self, request_id: str) -> bool:
        """The decode leg of `request_id` will not run: free the hold at the next `poll`, or once a push
        or staging copy reading it ends (no new one starts: cancelled). A hold a decode READ claimed
        stays until that READ's notification or cap; one whose claimed READs all ended (the hold lived on for
        another decode's push, between its chunks) is released."""
        with self.lock:
            hold = self._holds.get(request_id)
            if hold is None or read_running(hold):
                return False
            hold.cancelled = hold.done = True
        logger.info("KV of request %s released early: its decode leg will not run", request_id)
        return True

    def forget_engine(self, engine_id: str) -> list[str]:
        """Decode engine `engine_id` ended (its launcher asks before restarting it): end its part in every hold it
        was at (hold.py `drop_engine`: its claims, notifications and pushes; a claim or push of such a hold it sent
        before it died and still on its way is refused). A hold no other decode is at is freed at the next `poll`
        (once a push WRITE or staging copy still reading it ended); one another decode is at, or none took, stays.
        Returns the request ids of the holds it was at."""
        self.plans.forget(engine_id)
        with self.lock:
            return [hold.request_id for hold in self._holds.values() if drop_engine(hold, engine_id)]

    def poll(self, now: float) -> set[str]:
        """Requests whose blocks may be freed now; counts lease expiries."""
        finished: set[str] = set()
        with self.lock:
            for hold in list(self._holds.values()):
                if not hold.done and not hold.busy and now > hold.deadline:
                    self._end_at_deadline(hold)
                if hold.done and not hold.busy:
                    finished.add(hold.request_id)
                    del self._holds[hold.request_id]
                    read_by = readers_that_read(hold)
                    self._ended[hold.request_id] = (now + self.lease_seconds, read_by, how_it_ended(hold, read_by))
                    self._ended.move_to_end(hold.request_id)
                    if hold.expired:
                        KV_EXPIRED_REQUESTS.inc()
                        logger.warning("KV of request %s was not fetched within the %.1fs lease: freed",
                                       hold.request_id, self.lease_seconds)
            while self._ended and next(iter(self._ended.values()))[0] < now:
                self._ended.popitem(last=False)
            while self._pushes and next(iter(self._pushes.values())) < now:
                self._pushes.popitem(last=False)
            self._dropped.expire(now)
        return finished

    def _end_at_deadline(self, hold: Hold) -> None:
        """The hold's lease, or the cap of a decode READ's claim, passed (under the lock)."""
        hold.done = True
        hold.unended_claims = [reader_name(r) for r in sorted(hold.claimed_by) if not reader_done(hold, r)]
        # Fetched by one decode, or claimed by a READ that never said it ended: not a lease expiry.
        hold.expired = not (readers_that_read(hold) or hold.unended_claims)
        if hold.unended_claims:
            KV_CLAIM_CAP_FREES.inc()
            logger.warning("KV of request %s freed at the hard cap of the READ claim of %s: no read_done/release "
                           "came from it (the decode died, timed out, or its notification was lost)",
                           hold.request_id, ", ".join(hold.unended_claims))

    def __len__(self) -> int:
        with self.lock:
            return len(self._holds)

    def busy_ids(self) -> set[str]:
        with self.lock:
            return {h.request_id for h in self._holds.values() if h.busy}

    def claim_read(self, message: ClaimReadRequest) -> Empty:
        """Decode is about to READ the blocks of a held request: keep them past the lease until its
        read_done/release notification, at most `seconds` (decode's remaining time, clamped to the lease:
        a peer cannot pin blocks longer than an unread hold lives) + READ_GRACE_SECONDS."""
        cap = self._cap(message.seconds, "claim_read.seconds")
        reader = (message.reader, message.load)
        with self.lock:
            hold = self._holds.get(message.request_id)
            if hold is not None and message.reader in hold.ended_engines:
                raise engine_ended(message.request_id, message.reader)
            if hold is not None:
                read_by = readers_that_read(hold)
                how = how_it_ended(hold, read_by) if not hold.servable else None
            else:  # freed: who read it, if it was read
                _, read_by, how = self._ended.get(message.request_id, (0.0, frozenset(), None))
            if reader in read_by:
                return Empty()  # its READ ended (read_done) before this claim was served: it was held throughout
            # Another rank of a load that claimed the hold (resharding) may claim it while it lives.
            claimed = hold is not None and reader in hold.claimed_by and not hold.done
            if hold is None or not (hold.servable or claimed):
                if read_by:
                    raise KVTransferError(
                        f"request {message.request_id} was read by another load of its params "
                        f"({', '.join(map(reader_name, sorted(read_by)))}) and its blocks freed",
                        hint="one prefill's kv_transfer_params reached two decode loads (a client sent them again, "
                        "or a proxy retried a decode leg with them after its decode had read the KV); "
                        f"{REFUSED_LOAD}")
                raise not_held(message.request_id, self.lease_seconds, how)
            if not takes(hold, reader):
                raise too_many_loads(message.request_id)
            claim_for_read(hold, reader, cap)
        return Empty()

    def _cap(self, seconds: float, field: str) -> float:
        """When a READ claim of decode's remaining `seconds` ends at the latest (time.monotonic())."""
        if not 0.0 <= seconds < float("inf"):  # messages.py refuses these already; the clamp must hold alone
            raise KVTransferError(f"claim of {seconds!r} seconds", field=field)
        return time.monotonic() + min(seconds, self.lease_seconds) + READ_GRACE_SECONDS

    def cancel_push(self, message: CancelPushRequest) -> CancelPushAnswer:
        """Decode gave up a push (abort, timeout), or a load (pull or push) that ended before its transfer started:
        no WRITE of the cancelling load (`owner`) is posted any more. Answers in_flight: whether a push WRITE of that
        load may still land in its blocks; if so, the sender thread's push_done/push_failed notification says when it
        ended. Another decode's push of the same request id (its proxy retried the decode leg there) or staging copy
        is no WRITE into this one's blocks: not in flight for it (that push's notification goes to that decode
        alone). Frees the hold once no decode wants it any more (`given_up`): another decode's push goes on, and its
        blocks stay held until it ends or the lease does; a staging copy still reading them keeps them until it ends
        (`poll` frees no busy hold)."""
        with self.lock:
            hold = self._holds.get(message.request_id)
            return CancelPushAnswer(in_flight=hold is not None and cancel_push(hold, message.owner))
