"""The decode side's loads, as the engine thread sees them: what finished, failed, or drains.

A load that fails or is aborted while a push WRITE may still land (or a READ could not be stopped)
"drains": decode asks prefill to cancel ("cancel_push") and reports the request in `safe_to_free`
once prefill says nothing is in flight, the push_done/push_failed notification arrived, the READ
ended, or DRAIN_GRACE_SECONDS after the deadline (prefill posts no WRITE after decode's deadline). A push
over a transport that cannot cancel a running WRITE (Mooncake) drains up to the agent's
release_wait_seconds (plus release_wait_seconds_per_byte for each byte of the load: Mooncake's timeout grows
with the bytes) longer: the prefill waits that long for its WRITE before it says push_failed.
A READ of ours that the transport cannot cancel (Mooncake: `agent.release_cancels` is False) keeps the
blocks past the drain's end until it ended: freed under it, they would be given to another request while
the READ still writes them. Mooncake ends every transfer by its own timeout (MC_TRANSFER_TIMEOUT, 30 s by
default), which bounds that wait; no cap of ours frees them earlier, since that would be the silent
corruption this prevents. Over NIXL the drain's end releases the READ, which cancels it.

Each load's end is counted once, as it is reported (or at its abort): a load whose KV is in observes its bytes, its
end-to-end time (from start_load) and its data movement's (from its first transfer's post); a failed one counts a
failure; an aborted one nothing. A rank of a TP group (`reports_outcomes`) counts nothing itself: it hands each
load's LoadOutcome to rank 0 in its events, and rank 0 counts the request once for the group.
"""

from __future__ import annotations

import logging
import time

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import LoadOutcome
from pdlaunch.kv_transfer.checksum import verify_blocks
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState
from pdlaunch.kv_transfer.notifications import PushDone, PushFailed
from pdlaunch.metrics.kv_transfer import count_kv_transfer_failure, observe_kv_transfer

logger = logging.getLogger(__name__)

# After a load's deadline (plus the agent's release_wait_seconds for a push): a WRITE the prefill side
# posted before it has ended (prefill stops waiting for its WRITE at decode's deadline and cancels it, or
# waits for it where it cannot), and message latency is covered.
DRAIN_GRACE_SECONDS = 5.0


class LoadTable:
    def __init__(self, ctx: LoadContext) -> None:
        self.ctx = ctx
        self._lock = ctx.lock
        self._loads: dict[str, Load] = {}
        self._by_nonce: dict[str, Load] = {}
        self._draining: dict[str, Load] = {}  # failed/aborted loads whose blocks a transfer may still write
        self._new_draining: set[str] = set()  # failed loads of the last poll that drain
        # A rank of a TP group: each load's end goes to rank 0 (take_outcomes), which counts the group's once.
        self.reports_outcomes = False
        self._outcomes: dict[str, LoadOutcome] = {}  # ended since the last take_outcomes (reports_outcomes)

    def add(self, load: Load) -> None:
        with self._lock:
            self._loads[load.request_id] = load
            if not load.state.ended:
                self._by_nonce[load.nonce] = load

    def on_push_notif(self, notif: PushDone | PushFailed) -> None:
        with self._lock:
            load = self._by_nonce.get(notif.nonce)
            if load is None:
                return
            load.write_ended = True  # push_done comes after the WRITE, push_failed after it was stopped
            if isinstance(notif, PushDone):
                # Counts even past the deadline, before the next poll fails the load (unlike a pull's READ seen
                # done late, pull.py): the prefill held its source blocks (claimed, `busy`) until its WRITE ended,
                # and push_done goes out only once the bytes landed (it travels with the WRITE); our blocks are
                # still this request's while the load has not ended. An ended load (timed out, aborted) ignores it.
                if not load.state.ended:
                    load.state = LoadState.OK
            else:
                load.fail(f"the prefill side could not push: {notif.error}")

    def poll(self, now: float) -> tuple[set[str], dict[str, str]]:
        finished: set[str] = set()
        failed: dict[str, str] = {}
        with self._lock:
            loads = list(self._loads.values())
        for load in loads:
            with self._lock:
                strategy = load.strategy
                if load.state == LoadState.RUNNING and strategy is not None:
                    strategy.progress(load, now)
                grace = strategy.deadline_grace if strategy is not None and load.state == LoadState.RUNNING else 0.0
                if not load.state.ended and now > load.deadline + grace:
                    load.fail(f"KV of request {load.request_id} did not arrive within {self.ctx.transfer_timeout:g}s "
                              f"({load.mode or 'handshake'} from {load.where}, stage: {load.state.value})")
                state = load.state
            if state == LoadState.OK:
                try:
                    self._complete(load, now)
                    finished.add(load.request_id)
                except KVTransferError as e:
                    load.state, load.error = LoadState.FAILED, e.render()
            drain = False
            if load.state == LoadState.FAILED:
                with self._lock:
                    drain = self._may_write(load)
                    if drain:
                        self._start_drain(load, now)
                failed[load.request_id] = self._fail(load, drain)
            if drain:
                self._new_draining.add(load.request_id)
            elif load.state.ended:
                self._forget(load)
        return finished, failed

    def _may_write(self, load: Load) -> bool:
        """Whether a transfer may still write into the load's blocks (the lock is held)."""
        if (load.push_sent and not load.write_ended) or load.read_posting:
            return True
        return load.xfer is not None and load.xfer.state() == "PROC"

    def _start_drain(self, load: Load, now: float) -> None:
        """Keep a failed/aborted load's blocks from the engine until no transfer can write them (lock held)."""
        pushing = load.push_sent and not load.write_ended
        # The prefill waits for its running WRITE as long as it may land: Mooncake's timeout grows with the bytes
        # (MooncakeXfer.release_wait); the load's bytes bound any one WRITE of its push.
        agent = self.ctx.agent
        wait = agent.release_wait_seconds + load.num_bytes * agent.release_wait_seconds_per_byte if pushing else 0.0
        load.drain_until = max(now, load.deadline) + wait + DRAIN_GRACE_SECONDS
        self._draining[load.request_id] = load
        if self._loads.get(load.request_id) is load:
            del self._loads[load.request_id]
        strategy = load.strategy
        if pushing and strategy is not None:
            self.ctx.release_soon(load, lambda: strategy.cancel(load), "cancel")

    def poll_draining(self, now: float) -> tuple[set[str], set[str]]:
        """(failed loads of the last poll that drain, draining loads whose blocks may be freed now)."""
        safe: set[str] = set()
        with self._lock:
            loads = list(self._draining.values())
            new, self._new_draining = self._new_draining, set()
        for load in loads:
            if not self._drain_over(load, now):
                continue
            self._release(load)
            if load.strategy is not None:
                load.strategy.release_prefill(load)
            with self._lock:
                del self._draining[load.request_id]
                self._by_nonce.pop(load.nonce, None)
            self.ctx.chunks.forget(load.nonce)
            safe.add(load.request_id)
        return new, safe

    def _drain_over(self, load: Load, now: float) -> bool:
        """Whether the draining load's blocks may be freed now: no transfer can write them any more, or
        its drain ran out and what may still write them is a push (the prefill stopped it by then) or a
        READ that releasing cancels."""
        with self._lock:
            busy = self._may_write(load)
            if busy and now <= load.drain_until:
                return False
            held = busy and self._runs_uncancellable(load)
            first_hold = held and not load.held_past_drain
            load.held_past_drain = load.held_past_drain or held
            if not held:
                load.read_posting = False  # a READ whose post still runs: its loader releases it (post_read)
        if first_hold:
            logger.warning("request %s: its KV READ still runs %.0fs after its deadline and this transport cannot "
                           "cancel it; its blocks stay held until the READ ends (at the latest at Mooncake's "
                           "transfer timeout: MC_TRANSFER_TIMEOUT plus 1 s per GB it moves)", load.request_id,
                           now - load.deadline)
        elif busy and not held:
            logger.warning("request %s: no word that its KV transfer ended %.0fs after its deadline; freeing "
                           "its blocks", load.request_id, now - load.deadline)
        elif load.held_past_drain and not held:
            logger.info("request %s: its KV READ ended %.0fs after its deadline; freeing its blocks",
                        load.request_id, now - load.deadline)
        return not held

    def _runs_uncancellable(self, load: Load) -> bool:
        """A READ into the load's blocks is being posted or runs, and releasing it would not stop it (lock held)."""
        if self.ctx.agent.release_cancels:
            return False
        return load.read_posting or (load.xfer is not None and load.xfer.state() == "PROC")

    def _complete(self, load: Load, now: float) -> None:
        expected = load.remote.checksums if load.reshard is None else None  # resharded: checked per chunk
        if expected is None and self.ctx.verify_kv and load.num_bytes and load.reshard is None:
            raise KVTransferError(
                f"request {load.request_id}: kv_transfer.verify_kv is on here but {load.where} sent no kv_checksum",
                field="kv_transfer.verify_kv",
                hint="turn verify_kv on for the prefill instances too",
            )
        if expected is not None:
            spec = self.ctx.spec()
            for g, pairs in enumerate(load.pairs):
                verify_blocks(spec.kv_caches[g], g, [p[1] for p in pairs], [expected[g][p[0]] for p in pairs],
                              load.request_id)
        self._ended(load, LoadOutcome("done", load.num_bytes, max(0.0, now - load.started),
                                      None if load.posted is None else max(0.0, now - load.posted)))
        self._release(load)

    def _ended(self, load: Load, outcome: LoadOutcome) -> None:
        """Count how the load ended: here, or, on a rank of a TP group, in the events rank 0 counts (the lock is
        not held)."""
        if self.reports_outcomes:
            with self._lock:
                self._outcomes[load.request_id] = outcome
        elif outcome.end == "done":
            observe_kv_transfer(outcome.num_bytes, outcome.load_seconds, outcome.xfer_seconds)
        elif outcome.end == "failed":
            count_kv_transfer_failure()

    def take_outcomes(self) -> dict[str, LoadOutcome]:
        """The ends of the loads since the last call (`reports_outcomes`: a rank of a TP group), once each."""
        with self._lock:
            outcomes, self._outcomes = self._outcomes, {}
        return outcomes

    def _fail(self, load: Load, draining: bool = False) -> str:
        self._ended(load, LoadOutcome("failed"))
        if not draining and load.strategy is not None:  # else poll_draining releases once the transfer ended
            self._release(load)
            load.strategy.release_prefill(load)
            load.strategy.cancel_unsent(load)
        elif not draining:
            self._release(load)
        error = load.error or f"KV transfer of request {load.request_id} failed"
        logger.error("KV load of request %s failed: %s", load.request_id, error)
        return error

    def _release(self, load: Load) -> None:
        # Taken under the lock, as the loader's _end_read takes it: whichever takes it releases it, once.
        with self._lock:
            xfer, load.xfer = load.xfer, None
        if xfer is not None:
            xfer.release()

    def _forget(self, load: Load) -> None:
        with self._lock:
            if self._loads.get(load.request_id) is load:
                del self._loads[load.request_id]
            self._by_nonce.pop(load.nonce, None)
        self.ctx.chunks.forget(load.nonce)

    def abort(self, request_id: str) -> bool:
        """Drop a load; True when its blocks drain (a transfer may still write them: see poll_draining)."""
        with self._lock:
            load = self._loads.get(request_id)
            if load is None:
                return request_id in self._draining
            load.abandoned = True
            was_running = not load.state.ended
            # Failed but not reported yet: poll will not see it any more, so its failure is handled here.
            unreported = load.state == LoadState.FAILED
            load.fail("aborted")
            drain = self._may_write(load)
            if drain:
                self._start_drain(load, time.monotonic())
        if unreported:
            self._fail(load, drain)  # counts it; not draining: frees and tells the prefill to release
        else:
            self._ended(load, LoadOutcome("aborted"))  # counts nothing: a TP group's rank 0 hears its end
        if not unreported and not drain:
            self._release(load)
            if was_running and load.strategy is not None:  # as _fail: the prefill frees now, not at its lease's end
                load.strategy.release_prefill(load)
                load.strategy.cancel_unsent(load)
        if drain:
            return True
        self._forget(load)
        return False

    def request_ids(self) -> set[str]:
        """Loads still running or draining (they may hold staging slots)."""
        with self._lock:
            return set(self._loads) | set(self._draining)

    def running(self) -> list[str]:
        with self._lock:
            return list(self._loads)
