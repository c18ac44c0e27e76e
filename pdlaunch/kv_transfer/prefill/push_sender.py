"""Prefill side, push: sender threads WRITE held blocks into the blocks (or staging slots) a decode
announced, then notify it (push_done, or push_failed once nothing more lands).

A WRITE is never posted after decode's deadline (its remaining time travels with the push request)
nor after decode cancelled it ("cancel_push"); an in-flight WRITE is waited for (bounded).

Its notifications to the decode: push_done is the decode's only word that the bytes landed, so its
delivery is part of the transfer: it travels with the WRITE (the transport sends it once the bytes are
in; Mooncake tries twice), and a push of nothing sends it alone; a send that fails fails the push.
push_failed is best effort (logged when its send fails): a lost one costs the decode a wait until its
load's deadline (notifications.LOST_NOTIFICATION).

A decode engine that ended (`drop_queued`, HoldTable.forget_engine) gets nothing more: its pushes still queued are
dropped, one whose WRITE runs stops waiting for it (the WRITE is released, which cancels it where the transport
can), and no push_failed goes to it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.blocks import BlockRun, coalesce, run_descriptors
from pdlaunch.kv_transfer.messages import PushRequest
from pdlaunch.kv_transfer.notifications import PushDone, PushFailed, encode_notification
from pdlaunch.kv_transfer.prefill.hold import Hold
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.staging import StagingArea
from pdlaunch.kv_transfer.transport import TransferAgent, Xfer

logger = logging.getLogger(__name__)

# NIXL's UCX backend sends a WRITE's notification (push_done) only from check_xfer_state, once that call
# sees the WRITE complete: the time between two checks adds straight to decode's wait. The check interval
# grows with the time the WRITE has run (1/16 of it, within [_MIN_CHECK_SECONDS, _MAX_CHECK_SECONDS]), so
# a WRITE is seen done at most ~6% (or 0.25 ms) after it ended, with a few dozen checks per WRITE. A fixed
# 0.5 ms sleep cost ~0.3 ms on average per push; spinning instead fought NIXL's own progress thread for
# the UCX worker (measured on CPU: WRITE and notify both slower).
_MIN_CHECK_SECONDS = 0.00002
_MAX_CHECK_SECONDS = 0.00025


class PushCancelled(KVTransferError):
    """Decode cancelled the push (cancel_push), or the proxy released its hold: an expected end, logged at INFO."""


@dataclass
class PushTiming:
    """Where one push spent its time; time.monotonic() values (comparable across processes of one host)."""

    request_id: str
    num_bytes: int
    received: float  # the push request arrived on the side channel
    posting: float  # descriptors built, about to post the WRITE
    posted: float  # NIXL's post returned (on CPU DRAM, UCX copies within the post)
    done: float  # a check saw the WRITE complete (NIXL sent push_done then)


class PushSender:
    def __init__(self, agent: TransferAgent, holds: HoldTable, executor: ThreadPoolExecutor,
                 transfer_timeout: float) -> None:
        self.agent = agent
        self.holds = holds
        self.executor = executor
        self.transfer_timeout = transfer_timeout
        self.spec: KVCacheSpec | None = None
        self.staging: StagingArea | None = None
        self._timings: deque[PushTiming] = deque(maxlen=256)
        self._queued: dict[Future[None], tuple[Hold, PushRequest]] = {}  # submitted pushes, until they end
        self._lock = threading.Lock()

    def timings(self) -> list[PushTiming]:
        return list(self._timings)  # deque appends are atomic; a copy is a consistent snapshot

    def submit(self, hold: Hold, message: PushRequest, peer: str, received: float) -> None:
        future = self.executor.submit(self._push, hold, message, peer, received)
        with self._lock:
            self._queued[future] = (hold, message)
        future.add_done_callback(self._ended)  # outside the lock: it runs here if the push already ended

    def _ended(self, future: Future[None]) -> None:
        with self._lock:
            self._queued.pop(future, None)

    def drop_queued(self, engine_id: str) -> int:
        """Decode engine `engine_id` ended: its pushes not yet started never run (their claim of the hold ends as
        a failed push's does). Returns how many were dropped."""
        with self._lock:
            mine = [(f, hm) for f, hm in self._queued.items() if hm[1].reader == engine_id]
        dropped = 0
        for future, (hold, message) in mine:
            if future.cancel():  # False once a sender thread took it: that push ends by itself (`_push`)
                self.holds.unclaim_push(hold, message, failed=True)
                dropped += 1
        return dropped

    def _push(self, hold: Hold, message: PushRequest, peer: str, received: float) -> None:
        assert self.spec is not None
        # Never write after decode gave up: it frees its blocks soon after its own deadline.
        deadline = received + min(self.transfer_timeout, message.deadline_in)
        xfer: Xfer | None = None
        slots: list[int] = []
        failed = False
        try:
            check_wanted(hold, message, cancels=False)  # an ended decode's push waits for no staging slots
            bases = [t.data_ptr() for t in self.spec.kv_caches]
            # (prefill start, decode start, count) per run, or per run of staging slots
            runs = [[BlockRun(p, d, count) for d, p, count in group] for group in message.runs]
            if self.staging is not None:  # copy the blocks into plain memory first
                sources = message.prefill_blocks()
                slots = self.staging.acquire(max(map(len, sources), default=0), self.transfer_timeout)
                self.staging.gather(self.spec.kv_caches, sources, slots)
                runs = [coalesce((slot, d) for slot, (d, _) in zip(slots, group)) for group in message.pairs()]
                bases = [b.data_ptr() for b in self.staging.buffers]
            local: list[tuple[int, int]] = []
            remote: list[tuple[int, int]] = []
            for g, group_runs in enumerate(runs):
                lo, re = run_descriptors(group_runs, bases[g], message.base_addrs[g], self.spec.block_bytes[g])
                local += lo
                remote += re
            notif = encode_notification(PushDone(kind="push_done", nonce=message.nonce))
            if not local:
                self.agent.push_done(peer, notif)
                return
            # A cancel that comes after this check answers in_flight (pushing): decode then waits for our
            # push_done/push_failed, so posting without the lock is safe.
            check_wanted(hold, message)
            if time.monotonic() >= deadline:
                raise KVTransferError(f"push of request {hold.request_id} not posted: decode's deadline passed "
                                      "first", field="kv_transfer.transfer_timeout_seconds",
                                      hint="the prefill's sender threads are busy with other pushes")
            posting = time.monotonic()
            xfer = self.agent.transfer("WRITE", local, remote, peer, message.device_id, notif)
            posted = time.monotonic()
            state = wait_write(xfer, posted, deadline, lambda: message.reader in hold.ended_engines)
            if state != "DONE":
                check_wanted(hold, message, cancels=False)  # a WRITE to an ended decode fails as expected
                why = f"failed: {xfer.error}" if xfer.error else "failed"
                raise KVTransferError(
                    f"WRITE of {xfer.num_bytes} bytes for request {hold.request_id} "
                    + (why if state == "ERR" else "did not finish before decode's deadline"))
            self._timings.append(PushTiming(hold.request_id, xfer.num_bytes, received, posting, posted,
                                            time.monotonic()))
        except Exception as e:
            failed = True  # decode fails the request: the hold is freed unless another decode wants it
            text = e.render() if isinstance(e, KVTransferError) else f"{type(e).__name__}: {e}"
            if isinstance(e, PushCancelled):
                logger.info("%s", text)
            else:
                logger.error("push of request %s failed: %s", hold.request_id, text)
            if xfer is not None:  # cancel a WRITE still running before telling decode nothing more lands
                xfer.release()
                xfer = None
            try:
                if message.reader not in hold.ended_engines:  # an ended decode's agent is forgotten
                    self.agent.notify(peer, encode_notification(PushFailed(kind="push_failed", nonce=message.nonce,
                                                                           error=text[:4096])))
            except Exception as notify_error:  # noqa: BLE001 - decode then times out with its own message
                logger.warning("could not tell decode that the push failed: %s", notify_error)
        finally:
            if xfer is not None:
                xfer.release()
            if slots and self.staging is not None:
                self.staging.release(slots)
            self.holds.unclaim_push(hold, message, done=message.last and not failed, failed=failed)


def check_wanted(hold: Hold, message: PushRequest, cancels: bool = True) -> None:
    """Raise PushCancelled when the push of `message` is not wanted any more: its decode engine ended, or (with
    `cancels`) its decode cancelled it or the proxy released its hold."""
    if message.reader in hold.ended_engines:
        raise PushCancelled(f"push of request {hold.request_id} stopped: its decode engine {message.reader} ended")
    if cancels and hold.push_cancelled(message.owner):
        raise PushCancelled(f"push of request {hold.request_id} cancelled: its decode gave up on it, or its client "
                            "left")


def wait_write(xfer: Xfer, posted: float, deadline: float, stop: Callable[[], bool] = lambda: False) -> str:
    """The WRITE's final state ("DONE"/"ERR"), or "PROC" when `deadline` (time.monotonic()) came first or `stop()`
    said nothing waits for it any more."""
    while (state := xfer.state()) == "PROC":
        now = time.monotonic()
        if now >= deadline or stop():
            break
        time.sleep(min(max((now - posted) / 16, _MIN_CHECK_SECONDS), _MAX_CHECK_SECONDS, deadline - now))
    return state
