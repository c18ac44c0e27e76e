"""Prefill side, push: WRITE held blocks into the blocks (or staging slots) a decode announced, then
notify it (push_done, or push_failed once nothing more lands). The side-channel thread that received the
push request posts a direct WRITE itself (binding the instance's device first, as sender threads do when
they start) and a sender thread waits for it; a staged push (copies into staging slots first) runs on a
sender thread from the start.

A WRITE is never posted after decode's deadline (its remaining time travels with the push request)
nor after decode cancelled it ("cancel_push"); an in-flight WRITE is waited for (bounded).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.blocks import BlockRun, coalesce, run_descriptors
from pdlaunch.kv_transfer.messages import PushDone, PushFailed, PushRequest, encode_notification
from pdlaunch.kv_transfer.prefill.holds import Hold, HoldTable
from pdlaunch.kv_transfer.staging import StagingArea
from pdlaunch.kv_transfer.transport import TransferAgent, Xfer
from pdlaunch.memory import platform

logger = logging.getLogger(__name__)

# NIXL's UCX backend sends a WRITE's notification (push_done) only from check_xfer_state, once that call
# sees the WRITE complete: the time between two checks adds straight to decode's wait. The check interval
# grows with the time the WRITE has run (1/16 of it, within [_MIN_CHECK_SECONDS, _MAX_CHECK_SECONDS]), so
# a WRITE is seen done at most ~6% (or 0.25 ms) after it ended, with a few dozen checks per WRITE. A fixed
# 0.5 ms sleep cost ~0.3 ms on average per push; spinning instead fought NIXL's own progress thread for
# the UCX worker (measured on CPU: WRITE and notify both slower).
_MIN_CHECK_SECONDS = 0.00002
_MAX_CHECK_SECONDS = 0.00025


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
                 transfer_timeout: float, device_index: int) -> None:
        self.agent = agent
        self.device_index = device_index  # the instance's device: a thread that posts a WRITE binds it
        self.holds = holds
        self.executor = executor
        self.transfer_timeout = transfer_timeout
        self.spec: KVCacheSpec | None = None
        self.staging: StagingArea | None = None
        self._timings: deque[PushTiming] = deque(maxlen=256)

    def timings(self) -> list[PushTiming]:
        return list(self._timings)  # deque appends are atomic; a copy is a consistent snapshot

    def submit(self, hold: Hold, message: PushRequest, peer: str, received: float) -> None:
        """Start the push of `hold` that `message` asks for. Direct pushes post their WRITE here, on the
        side-channel thread that received the request (a hand-off to a sender thread first cost ~0.1 ms
        before every WRITE), and a sender thread waits for it; staged pushes copy into staging slots first,
        all of it on a sender thread."""
        push = _Push(hold, message, peer, received, received + min(self.transfer_timeout, message.deadline_in))
        if self.staging is not None:
            self.executor.submit(self._run, push)
            return
        if platform.bound_device_index() != self.device_index:  # CUDA's current device is per thread
            platform.set_device(self.device_index)
        if self._step(push, self._post) and self._step(push, self._ended):
            try:
                self.executor.submit(self._step, push, self._wait)
            except RuntimeError:  # the pool is shutting down: wait for the posted WRITE here
                self._step(push, self._wait)

    def _run(self, push: _Push) -> None:
        if self._step(push, self._post):
            self._step(push, self._wait)

    def _step(self, push: _Push, step: Callable[[_Push], bool]) -> bool:
        """step(push): True when the push goes on to its next step; when it ended, or failed (decode is told
        push_failed, after cancelling a WRITE still running), its WRITE and slots are released and its hold
        unclaimed: False."""
        try:
            if step(push):
                return True
            self._end(push, failed=False)
        except Exception as e:
            text = e.render() if isinstance(e, KVTransferError) else f"{type(e).__name__}: {e}"
            logger.error("push of request %s failed: %s", push.hold.request_id, text)
            if push.xfer is not None:  # cancel a WRITE still running before telling decode nothing more lands
                push.xfer.release()
                push.xfer = None
            try:
                self.agent.notify(push.peer, encode_notification(PushFailed(kind="push_failed",
                                                                            nonce=push.message.nonce,
                                                                            error=text[:4096])))
            except Exception as notify_error:  # noqa: BLE001 - decode then times out with its own message
                logger.warning("could not tell decode that the push failed: %s", notify_error)
            self._end(push, failed=True)  # decode fails the request: free the blocks now
        return False

    def _post(self, push: _Push) -> bool:
        """Descriptors, then the WRITE posted; False when there is nothing to WRITE (decode notified)."""
        assert self.spec is not None
        hold, message = push.hold, push.message
        bases = [t.data_ptr() for t in self.spec.kv_caches]
        # (prefill start, decode start, count) per run, or per run of staging slots
        runs = [[BlockRun(p, d, count) for d, p, count in group] for group in message.runs]
        if self.staging is not None:  # copy the blocks into plain memory first
            sources = message.prefill_blocks()
            push.slots = self.staging.acquire(max(map(len, sources), default=0), self.transfer_timeout)
            self.staging.gather(self.spec.kv_caches, sources, push.slots)
            runs = [coalesce((slot, d) for slot, (d, _) in zip(push.slots, group)) for group in message.pairs()]
            bases = [b.data_ptr() for b in self.staging.buffers]
        local: list[tuple[int, int]] = []
        remote: list[tuple[int, int]] = []
        for g, group_runs in enumerate(runs):
            lo, re = run_descriptors(group_runs, bases[g], message.base_addrs[g], self.spec.block_bytes[g])
            local += lo
            remote += re
        notif = encode_notification(PushDone(kind="push_done", nonce=message.nonce))
        if not local:
            self.agent.notify(push.peer, notif)
            return False
        # Never write after decode gave up: it frees its blocks soon after its own deadline. A cancel that
        # comes after this check answers in_flight (busy): decode then waits for our push_done/push_failed,
        # so posting without the lock is safe.
        if hold.cancelled or time.monotonic() >= push.deadline:
            raise KVTransferError(f"push of request {hold.request_id} cancelled: decode gave up on it")
        push.posting = time.monotonic()
        push.xfer = self.agent.transfer("WRITE", local, remote, push.peer, message.device_id, notif)
        push.posted = time.monotonic()
        return True

    def _ended(self, push: _Push) -> bool:
        """One check of the posted WRITE: False when it has ended already (on CPU memory UCX copies within
        the post; the check sends push_done at once), True when it still runs."""
        assert push.xfer is not None
        return push.xfer.state() == "PROC" or self._wait(push)

    def _wait(self, push: _Push) -> bool:
        """Until the posted WRITE ended (NIXL sends push_done then); False: the push is complete."""
        assert push.xfer is not None
        state = wait_write(push.xfer, push.posted, push.deadline)
        if state != "DONE":
            raise KVTransferError(
                f"WRITE of {push.xfer.num_bytes} bytes for request {push.hold.request_id} "
                + ("failed in NIXL" if state == "ERR" else "did not finish before decode's deadline"))
        self._timings.append(PushTiming(push.hold.request_id, push.xfer.num_bytes, push.received, push.posting,
                                        push.posted, time.monotonic()))
        return False

    def _end(self, push: _Push, failed: bool) -> None:
        if push.xfer is not None:
            push.xfer.release()
            push.xfer = None
        if push.slots and self.staging is not None:
            self.staging.release(push.slots)
        self.holds.unclaim(push.hold, done=failed or push.message.last)


@dataclass
class _Push:
    """One push request being served: what it asks, and what it holds until it ends."""

    hold: Hold
    message: PushRequest
    peer: str  # decode's agent name
    received: float
    deadline: float  # time.monotonic(): no WRITE is posted after this, nor waited for
    xfer: Xfer | None = None
    slots: list[int] = field(default_factory=list)  # staging slots (staged pushes)
    posting: float = 0.0
    posted: float = 0.0


def wait_write(xfer: Xfer, posted: float, deadline: float) -> str:
    """The WRITE's final state ("DONE"/"ERR"), or "PROC" when `deadline` (time.monotonic()) came first."""
    while (state := xfer.state()) == "PROC":
        now = time.monotonic()
        if now >= deadline:
            break
        time.sleep(min(max((now - posted) / 16, _MIN_CHECK_SECONDS), _MAX_CHECK_SECONDS, deadline - now))
    return state
