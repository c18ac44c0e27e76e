"""The prefill side's table of held requests (`HoldTable`, by request id): holds, their leases, the claims
of decode READs (claim_read, or a staged pull's stage request), pushes and staging copies, cancels and release
notifications, and decode engines that ended (`forget_engine`). What one hold holds and when it ends: hold.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.messages import CancelPushAnswer, CancelPushRequest, ClaimReadRequest, Empty, PushRequest
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.prefill.hold import (
    Hold,
    cancel_push,
    claim_for_read,
    drop_engine,
    end_claim,
    engine_ended,
    how_it_ended,
    not_held,
    read_running,
    reader_done,
    readers_that_read,
    take_notification,
)
from pdlaunch.kv_transfer.push_params import client_request_id
from pdlaunch.metrics.kv_transfer import KV_CLAIM_CAP_FREES, KV_EXPIRED_REQUESTS

logger = logging.getLogger(__name__)

# A claimed READ may outlive decode's deadline by this much (message latency, a READ completing as
# decode gives up); decode accepts a READ only when it saw it done before its own deadline.
READ_GRACE_SECONDS = 5.0


class HoldTable:
    """Holds by request id; `poll` runs on the engine thread, claims on side-channel and sender threads."""

    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self.lock = threading.Lock()
        self._unclaimed = threading.Condition(self.lock)  # a claim ended: an exclusive claim may go on
        self._holds: dict[str, Hold] = {}
        # Requests whose hold ended, kept a lease long: a claim sent with its READ may arrive after the read_done
        # (claim_read answers it as claimed), and a decode's release may come after the proxy's (logged as
        # expected, not as a lost hold). request id -> (when to forget it, the readers that read it, how it ended).
        self._ended: OrderedDict[str, tuple[float, frozenset[str], str]] = OrderedDict()
        # Nonces of push requests accepted (push nonce -> when to forget it, monotonic): decode's side channel
        # sends a request again when the connection reset before the answer, and a push is then already queued.
        self._pushes: OrderedDict[str, float] = OrderedDict()

    def hold(self, request_id: str, block_ids: list[list[int]], prompt_digest: str | None = None) -> None:
        with self.lock:
            self._holds[request_id] = Hold(request_id, [list(b) for b in block_ids],
                                           time.monotonic() + self.lease_seconds, prompt_digest=prompt_digest)

    def get(self, request_id: str) -> Hold | None:
        with self.lock:
            return self._holds.get(request_id)

    def find(self, request_id: str | None, client_id: str, digest: str) -> tuple[str, list[list[int]]] | None:
        """(request id, block ids) of a servable hold named `request_id`, else (None) of the request of the
        client's X-Request-Id `client_id`; only when its prompt's digest is `digest`."""
        with self.lock:
            for hold in self._holds.values():
                named = hold.request_id == request_id if request_id else client_request_id(hold.request_id) == client_id
                if named and hold.servable and not (hold.expired or hold.busy) and hold.prompt_digest == digest:
                    return hold.request_id, [list(b) for b in hold.block_ids]
        return None

    def on_read_done(self, notif: ReadDone) -> None:
        """A decode agent finished reading (read_done) or gave up (release) on a request: the hold ends once
        that reader's notifications are all in and no other decode that took the hold is still at it (`through`:
        a claimed READ, a push between its chunks)."""
        with self.lock:
            hold = self._holds.get(notif.request_id)
            if hold is not None:
                take_notification(hold, notif.reader, notif.kind == "read_done", notif.readers)
            ended = None if hold is not None else self._ended.get(notif.request_id)
        if ended is not None:  # e.g. the proxy released it (its client left), then the decode aborted its load
            logger.debug("KV %s notification from %s for request %s after its hold ended (%s)", notif.kind,
                         notif.reader, notif.request_id, ended[2])
        elif hold is None:
            logger.warning("KV %s notification from %s for request %s, which is not held here (its lease of %gs "
                           "expired long ago, or the prefill restarted)", notif.kind, notif.reader, notif.request_id,
                           self.lease_seconds)

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
        return finished

    def _end_at_deadline(self, hold: Hold) -> None:
        """The hold's lease, or the cap of a decode READ's claim, passed (under the lock)."""
        hold.done = True
        hold.unended_claims = sorted(r for r in hold.claimed_by if not reader_done(hold, r))
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
        with self.lock:
            hold = self._holds.get(message.request_id)
            if hold is not None and message.reader in hold.ended_engines:
                raise engine_ended(message.request_id, message.reader)
            if hold is not None:
                read_by = readers_that_read(hold)
                how = how_it_ended(hold, read_by) if not hold.servable else None
            else:  # freed: who read it, if it was read
                _, read_by, how = self._ended.get(message.request_id, (0.0, frozenset(), None))
            if message.reader in read_by:
                return Empty()  # its READ ended (read_done) before this claim was served: it was held throughout
            # Another rank of a reader that claimed the hold (resharding) may claim it while it lives.
            claimed = hold is not None and message.reader in hold.claimed_by and not hold.done
            if hold is None or not (hold.servable or claimed):
                if read_by:
                    raise KVTransferError(
                        f"request {message.request_id} was read by another decode ({', '.join(sorted(read_by))}) "
                        "and its blocks freed", hint="the proxy sent one prefill's KV to two decodes (the first "
                        "died): this one computes the prompt itself")
                raise not_held(message.request_id, self.lease_seconds, how)
            claim_for_read(hold, message.reader, cap)
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

    def claim(self, request_id: str, sources: list[list[int]], block_bytes: list[int], spec: KVCacheSpec | None,
              exclusive: bool = False, wait: float = 0.0, reader: tuple[str, float] | None = None) -> Hold:
        """reader: (decode engine id, its remaining seconds) of a staging copy, which also claims the hold for that
        reader as `claim_read` does: a staged pull READs the slots chunk after chunk, and the blocks stay held
        (past the lease, capped) until its read_done/release."""
        read_claim = None if reader is None else (reader[0], self._cap(reader[1], "stage.seconds"))
        hold = self._claim(request_id, sources, block_bytes, spec, exclusive, wait, None, read_claim)
        assert hold is not None  # None only for a push
        return hold

    def claim_push(self, message: PushRequest, spec: KVCacheSpec | None, wait: float) -> Hold | None:
        """An exclusive `claim` of the blocks the push request `message` names, counted for its owner until
        `unclaim_push`; None when that push (its nonce) was accepted already (decode sent it again after losing
        the answer: the first copy's push_done/push_failed ends it). A push that cannot be queued after its
        claim must `forget_push`, so that a resend is served."""
        return self._claim(message.request_id, message.prefill_blocks(), message.block_bytes, spec, True, wait,
                           message)

    def forget_push(self, nonce: str) -> None:
        with self.lock:
            self._pushes.pop(nonce, None)

    def _claim(self, request_id: str, sources: list[list[int]], block_bytes: list[int], spec: KVCacheSpec | None,
               exclusive: bool, wait: float, push: PushRequest | None,
               read_claim: tuple[str, float] | None = None) -> Hold | None:
        """The hold of `request_id`, marked busy, after checking the request only names blocks it holds
        (sources[g]: prefill block ids of group g). exclusive: one claim at a time (a push); while another
        is active, wait up to `wait` seconds for it to end, then refuse. A staged push's next chunk needs the
        wait: NIXL hands decode the last chunk's push_done with the WRITE, so decode can ask for the next one
        before this side's sender thread has seen the WRITE end and unclaimed. Stagings of several decode
        ranks reading one request (resharding) may overlap. read_claim: (reader, cap) a staging copy claims."""
        if spec is None:
            raise KVTransferError("this prefill engine has not registered its KV cache yet")
        if block_bytes != spec.block_bytes:
            raise KVTransferError(
                f"request {request_id}: decode blocks are {block_bytes} bytes, mine {spec.block_bytes}",
                hint="prefill and decode must run the same model, dtype, block size and TP size",
            )
        if len(sources) != len(spec.kv_caches):
            raise KVTransferError(f"request {request_id}: {len(sources)} KV-cache groups named, this engine has "
                                  f"{len(spec.kv_caches)}")
        deadline = time.monotonic() + wait
        with self.lock:
            while True:
                if push is not None and push.nonce in self._pushes:
                    return None
                hold = self._holds.get(request_id)
                if hold is None or not hold.servable:
                    raise not_held(request_id, self.lease_seconds)
                reader = push.reader if push is not None else read_claim[0] if read_claim is not None else ""
                if reader in hold.ended_engines:
                    raise engine_ended(request_id, reader)
                if push is not None and push.owner in hold.cancelled_by:
                    raise KVTransferError(f"push of request {request_id} refused: its decode load {push.owner} "
                                          "cancelled it before", hint="that load was given up; nothing to load")
                if not (exclusive and hold.busy):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KVTransferError(f"request {request_id} is already being sent (waited {wait:g}s for the "
                                          "send before it to end)")
                self._unclaimed.wait(left)
            for g, ids in enumerate(sources):
                if not set(ids) <= set(hold.block_ids[g]) - {-1}:
                    raise KVTransferError(f"request {request_id} names blocks of group {g} it does not hold")
            hold.busy += 1
            if read_claim is not None:
                claim_for_read(hold, *read_claim)
            if push is not None:  # its nonce is forgotten once decode cannot send it again (its deadline passed)
                hold.pushing[push.owner] = hold.pushing.get(push.owner, 0) + 1
                hold.push_owners.add(push.owner)
                hold.push_readers[push.owner] = push.reader
                self._pushes[push.nonce] = time.monotonic() + wait + self.lease_seconds
        return hold

    def unclaim(self, hold: Hold, done: bool = False) -> None:
        """A `claim` ended; done: the hold may be freed once no other decode is at it (`through`). So may a hold
        whose push a decode cancelled once no decode wants it any more (`given_up`, as `cancel_push` frees one)."""
        self._unclaim(hold, done)

    def unclaim_push(self, hold: Hold, message: PushRequest, done: bool = False, failed: bool = False) -> None:
        """The `claim_push` of `message` ended: its WRITE ended or was never posted; done: its last chunk was
        sent, which ends that load's push (a claimed READ or another decode's push under way still keeps the
        hold). failed (or cancelled): its load fails, which ends that load's interest in the hold, as its
        `cancel_push` would."""
        self._unclaim(hold, done, message.owner, failed)

    def _unclaim(self, hold: Hold, done: bool, push_owner: str | None = None, failed: bool = False) -> None:
        with self.lock:
            end_claim(hold, done, push_owner, failed)
            self._unclaimed.notify_all()
