"""The claims of a held request's blocks by the copies that read them (`CopyClaims`, the base of HoldTable:
prefill/holds.py): a push's WRITE into a decode's blocks (`claim_push`: exclusive, one at a time, each push
nonce accepted once) and a staging copy into the prefill's staging slots (`claim`, which also claims the hold
for its reader's READ). A claimed hold is `busy`: it neither expires nor is freed while a copy reads its blocks;
`unclaim` ends a claim, and may end the hold (hold.py `end_claim`). A claim names only blocks the hold holds.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.messages import PushRequest
from pdlaunch.kv_transfer.prefill.hold import (
    Hold,
    Reader,
    claim_for_read,
    end_claim,
    engine_ended,
    not_held,
    takes,
    too_many_loads,
)


class CopyClaims:
    """The copy claims of `HoldTable` (its base)."""

    # The table's parts these methods use; HoldTable.__init__ builds them.
    lease_seconds: float
    lock: threading.Lock
    _unclaimed: threading.Condition  # a claim ended: an exclusive claim may go on
    _holds: dict[str, Hold]
    # Nonces of push requests accepted (push nonce -> when to forget it, monotonic): decode's side channel
    # sends a request again when the connection reset before the answer, and a push is then already queued.
    _pushes: OrderedDict[str, float]

    if TYPE_CHECKING:  # HoldTable's (a READ claim's cap)
        def _cap(self, seconds: float, field: str) -> float: ...

    def claim(self, request_id: str, sources: list[list[int]], block_bytes: list[int], spec: KVCacheSpec | None,
              exclusive: bool = False, wait: float = 0.0, reader: tuple[Reader, float] | None = None) -> Hold:
        """reader: ((decode engine id, load id), its remaining seconds) of a staging copy, which also claims the hold
        for that load as `claim_read` does: a staged pull READs the slots chunk after chunk, and the blocks stay held
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
               read_claim: tuple[Reader, float] | None = None) -> Hold | None:
        """The hold of `request_id`, marked busy, after checking the request only names blocks it holds
        (sources[g]: prefill block ids of group g). exclusive: one claim at a time (a push); while another
        is active, wait up to `wait` seconds for it to end, then refuse. A staged push's next chunk needs the
        wait: NIXL hands decode the last chunk's push_done with the WRITE, so decode can ask for the next one
        before this side's sender thread has seen the WRITE end and unclaimed. Stagings of several decode
        ranks reading one request (resharding) may overlap. read_claim: (load, cap) a staging copy claims."""
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
                reader = push.reader if push is not None else read_claim[0][0] if read_claim is not None else ""
                if reader in hold.ended_engines:
                    raise engine_ended(request_id, reader)
                if read_claim is not None and not takes(hold, read_claim[0]):
                    raise too_many_loads(request_id)
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
