"""Decode engines the prefill was told ended (`HoldTable.forget_engine`: a decode died and its launcher asks its
peers to forget it before restarting it under a new engine id), remembered a lease long: a claim, stage request
or push it sent just before it died may still be on its way, and must not take a hold again (it would keep the
blocks until the claim's cap or the lease, with nobody left to read them).
"""

from __future__ import annotations

from collections import OrderedDict

from pdlaunch.errors import KVTransferError


class EndedEngines:
    """Engine ids, each until a lease after it ended; guarded by the HoldTable's lock (not thread-safe alone)."""

    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._until: OrderedDict[str, float] = OrderedDict()  # engine id -> when to forget it (monotonic), oldest first

    def add(self, engine_id: str, now: float) -> None:
        self._until[engine_id] = now + self.lease_seconds
        self._until.move_to_end(engine_id)

    def refuse(self, request_id: str, engine_id: str | None) -> None:
        """Raise when `engine_id` (the decode that sent a claim or push of `request_id`) ended."""
        if engine_id is not None and engine_id in self._until:
            raise KVTransferError(f"request {request_id}: decode engine {engine_id} ended (this prefill was told "
                                  "to forget it) before its message was served", hint="nothing to load")

    def prune(self, now: float) -> None:
        while self._until and next(iter(self._until.values())) < now:
            self._until.popitem(last=False)
