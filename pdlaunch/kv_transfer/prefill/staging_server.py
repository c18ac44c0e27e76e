"""Prefill side, staging (staging.py): held blocks copied into plain staging slots that a decode READs
("stage"), freed when it says it read them ("unstage") or at the ticket's deadline. A stage request also
claims the hold for its reader (prefill/hold.py), so a staged pull's next chunk finds the blocks held.

A ticket outlives the decode's use of its slots: it ends a transfer timeout after its copy, the decode's load
a transfer timeout after it started (before its stage request), and the decode counts a READ of the slots
only when it saw it done before that (decode/reads.py `read_chunk`). Only then may `expire` hand the slots
to another request's copy. A decode engine that ended (its launcher told the prefill to forget it: `forget_engine`)
reads nothing more: its tickets' slots go back at once, and a copy for it still queued or running keeps none.

Decode's side channel sends a request again when the connection resets before the answer. A stage
request's nonce names it: a resend gets the first copy's answer (waiting for that copy if it still runs),
is refused once that copy's slots were released, and is served anew only when the first copy failed.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.messages import Empty, StageAnswer, StageRequest, UnstageRequest
from pdlaunch.kv_transfer.prefill.hold import Hold
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.staging import StagingArea

logger = logging.getLogger(__name__)


@dataclass
class Ticket:
    """Staging slots holding a copy of some held blocks until decode has read them ("unstage")."""

    slots: list[int]
    deadline: float
    request_id: str = ""
    reader: str = ""  # the decode engine that READs the slots
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


@dataclass
class _Copy:
    """One staging copy's outcome, guarded by StagingServer._lock: the ticket it registered, or that its
    requester stopped waiting first (then it registers none). Either the answer names the ticket, or the
    slots go back."""

    ticket: Ticket | None = None
    abandoned: bool = False


@dataclass
class _Staged:
    """A stage request by nonce: its answer once its copy ended (None: still running, or it failed)."""

    forget_at: float  # time.monotonic()
    ended: threading.Event = field(default_factory=threading.Event)
    answer: StageAnswer | None = None


class StagingServer:
    def __init__(self, holds: HoldTable, executor: ThreadPoolExecutor, transfer_timeout: float) -> None:
        self.holds = holds
        self.executor = executor  # the sender pool: its threads bind the instance's device
        self.transfer_timeout = transfer_timeout
        self.spec: KVCacheSpec | None = None
        self.staging: StagingArea | None = None
        self._tickets: dict[str, Ticket] = {}
        self._staged: OrderedDict[str, _Staged] = OrderedDict()  # by nonce, oldest first
        self._lock = threading.Lock()

    def stage(self, message: StageRequest) -> StageAnswer:
        """Copy held blocks into staging slots for a decode READ; the answer names the slots and a ticket."""
        if message.nonce is None:
            return self._stage_once(message)
        nonce = message.nonce
        with self._lock:
            first = self._staged.get(nonce)
            if first is None:
                # Kept past the first copy's wait and its ticket's deadline: no resend comes later.
                staged = self._staged[nonce] = _Staged(time.monotonic() + 2 * self.transfer_timeout
                                                       + self.holds.lease_seconds)
        if first is not None:
            return self._answer_resend(message, first)
        try:
            staged.answer = self._stage_once(message)
        except BaseException:
            with self._lock:
                self._staged.pop(nonce, None)  # nothing staged: a resend is served anew
            raise
        finally:
            staged.ended.set()
        return staged.answer

    def _answer_resend(self, message: StageRequest, first: _Staged) -> StageAnswer:
        if not first.ended.wait(self.transfer_timeout):
            raise KVTransferError(f"staging request {message.nonce} of request {message.request_id} was sent again "
                                  f"and its first copy did not end within {self.transfer_timeout:g}s",
                                  field="kv_transfer.transfer_timeout_seconds")
        answer = first.answer
        if answer is None:
            raise KVTransferError(f"staging request {message.nonce} of request {message.request_id} was sent again "
                                  "while its first copy ran, and that copy failed")
        with self._lock:
            live = answer.ticket in self._tickets
        if not live:
            raise KVTransferError(f"staging request {message.nonce} of request {message.request_id} was sent again "
                                  "after its slots were released (unstaged, or its ticket expired)",
                                  hint="the decode computes the prompt, or retries the load")
        logger.debug("staging request %s of request %s sent again: answered with its ticket", message.nonce,
                     message.request_id)
        return answer

    def _stage_once(self, message: StageRequest) -> StageAnswer:
        if self.staging is None:
            raise KVTransferError("this prefill engine does not stage its KV cache")
        blocks = message.blocks
        block_bytes = self.spec.block_bytes if self.spec else []
        # Claims the hold for the staged pull's load too, until its read_done/release (capped).
        hold = self.holds.claim(message.request_id, blocks, block_bytes, self.spec,
                                reader=((message.reader, message.load), message.seconds))
        copy = _Copy()
        try:
            future = self.executor.submit(self._stage, hold, message.request_id, message.reader, blocks, copy)
        except BaseException:
            self.holds.unclaim(hold)
            raise
        try:
            ticket = future.result(timeout=self.transfer_timeout)
        except FutureTimeout:
            with self._lock:
                copy.abandoned = True
                staged = copy.ticket  # registered as the wait ran out: the answer names it
            if staged is None:
                # The copy keeps the hold claimed while it reads the blocks; one still queued never runs.
                if future.cancel():
                    self.holds.unclaim(hold)
                raise KVTransferError(
                    f"staging {max(map(len, blocks), default=0)} blocks of request {message.request_id} did not "
                    f"finish within {self.transfer_timeout:g}s", field="kv_transfer.transfer_timeout_seconds",
                    hint="the prefill's sender threads or staging slots are busy with other transfers") from None
            ticket = staged
        return StageAnswer(ticket=ticket.id, slots=[ticket.slots[:len(ids)] for ids in blocks])

    def unstage(self, message: UnstageRequest) -> Empty:
        with self._lock:
            ticket = self._tickets.pop(message.ticket, None)
        if ticket is not None and self.staging is not None:
            self.staging.release(ticket.slots)
        return Empty()

    def expire(self, now: float) -> None:
        """Release the slots of tickets whose decode never said it read them (died, timed out)."""
        with self._lock:
            stale = [t for t in self._tickets.values() if now > t.deadline]
            for ticket in stale:
                del self._tickets[ticket.id]
            while self._staged and next(iter(self._staged.values())).forget_at < now:
                self._staged.popitem(last=False)
        for ticket in stale:
            logger.warning("staging slots of request %s were not unstaged in time: released", ticket.request_id)
            if self.staging is not None:
                self.staging.release(ticket.slots)

    def forget_engine(self, engine_id: str) -> int:
        """Decode engine `engine_id` ended: release the slots of its tickets now (nothing READs them any more).
        Returns how many slots went back."""
        with self._lock:
            gone = [t for t in self._tickets.values() if t.reader == engine_id]
            for ticket in gone:
                del self._tickets[ticket.id]
        if self.staging is not None:
            for ticket in gone:
                self.staging.release(ticket.slots)
        return sum(len(t.slots) for t in gone)

    def users(self) -> set[str]:
        with self._lock:
            return {t.request_id for t in self._tickets.values()}

    def _stage(self, hold: Hold, request_id: str, reader: str, blocks: list[list[int]], copy: _Copy) -> Ticket:
        """Sender thread: gather the blocks into free slots (waits for slots up to the transfer timeout), then
        unclaim the hold. A copy whose decode stopped waiting (`copy.abandoned`) or ended keeps no slots: the ended
        check under the lock, after HoldTable.forget_engine marked the hold, leaves no ticket `forget_engine` missed."""
        try:
            staging, spec = self.staging, self.spec
            if staging is None or spec is None:
                raise KVTransferError("this prefill engine does not stage its KV cache")
            if reader in hold.ended_engines:
                raise KVTransferError(f"staging of request {request_id} dropped: its decode engine {reader} ended")
            slots = staging.acquire(max(map(len, blocks), default=0), self.transfer_timeout)
            try:
                staging.gather(spec.kv_caches, blocks, slots)
                ticket = Ticket(slots, time.monotonic() + self.transfer_timeout, request_id, reader)
                with self._lock:
                    if copy.abandoned or reader in hold.ended_engines:
                        raise KVTransferError(f"staging of request {request_id} was given up")
                    self._tickets[ticket.id] = copy.ticket = ticket
            except BaseException:
                staging.release(slots)
                raise
            return ticket
        finally:
            self.holds.unclaim(hold)
