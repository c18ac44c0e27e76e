"""Prefill side, staging (staging.py): held blocks copied into plain staging slots that a decode READs
("stage"), freed when it says it read them ("unstage") or at the ticket's deadline."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.messages import Empty, StageAnswer, StageRequest, UnstageRequest
from pdlaunch.kv_transfer.prefill.holds import Hold, HoldTable
from pdlaunch.kv_transfer.staging import StagingArea

logger = logging.getLogger(__name__)


@dataclass
class Ticket:
    """Staging slots holding a copy of some held blocks until decode has read them ("unstage")."""

    slots: list[int]
    deadline: float
    request_id: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


class StagingServer:
    def __init__(self, holds: HoldTable, executor: ThreadPoolExecutor, transfer_timeout: float) -> None:
        self.holds = holds
        self.executor = executor  # the sender pool: its threads bind the instance's device
        self.transfer_timeout = transfer_timeout
        self.spec: KVCacheSpec | None = None
        self.staging: StagingArea | None = None
        self._tickets: dict[str, Ticket] = {}
        self._lock = threading.Lock()

    def stage(self, message: StageRequest) -> StageAnswer:
        """Copy held blocks into staging slots for a decode READ; the answer names the slots and a ticket."""
        if self.staging is None:
            raise KVTransferError("this prefill engine does not stage its KV cache")
        blocks = message.blocks
        block_bytes = self.spec.block_bytes if self.spec else []
        hold = self.holds.claim(message.request_id, blocks, block_bytes, self.spec)
        abandoned = threading.Event()
        try:
            future = self.executor.submit(self._stage, hold, message.request_id, blocks, abandoned)
        except BaseException:
            self.holds.unclaim(hold)
            raise
        try:
            ticket = future.result(timeout=self.transfer_timeout)
        except FutureTimeout:
            # The copy keeps the hold claimed while it reads the blocks; one still queued never runs.
            abandoned.set()
            if future.cancel():
                self.holds.unclaim(hold)
            raise KVTransferError(
                f"staging {max(map(len, blocks), default=0)} blocks of request {message.request_id} did not finish "
                f"within {self.transfer_timeout:g}s", field="kv_transfer.transfer_timeout_seconds",
                hint="the prefill's sender threads or staging slots are busy with other transfers") from None
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
        for ticket in stale:
            logger.warning("staging slots of request %s were not unstaged in time: released", ticket.request_id)
            if self.staging is not None:
                self.staging.release(ticket.slots)

    def users(self) -> set[str]:
        with self._lock:
            return {t.request_id for t in self._tickets.values()}

    def _stage(self, hold: Hold, request_id: str, blocks: list[list[int]], abandoned: threading.Event) -> Ticket:
        """Sender thread: gather the blocks into free slots (waits for slots up to the transfer timeout), then
        unclaim the hold. A copy whose decode stopped waiting (`abandoned`) keeps no slots."""
        try:
            staging, spec = self.staging, self.spec
            if staging is None or spec is None:
                raise KVTransferError("this prefill engine does not stage its KV cache")
            slots = staging.acquire(max(map(len, blocks), default=0), self.transfer_timeout)
            try:
                staging.gather(spec.kv_caches, blocks, slots)
                ticket = Ticket(slots, time.monotonic() + self.transfer_timeout, request_id)
                with self._lock:
                    if abandoned.is_set():
                        raise KVTransferError(f"staging of request {request_id} was given up")
                    self._tickets[ticket.id] = ticket
            except BaseException:
                staging.release(slots)
                raise
            return ticket
        finally:
            self.holds.unclaim(hold)
