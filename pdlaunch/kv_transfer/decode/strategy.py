"""The interface of a decode-side load strategy: how the bytes of one load move.

Chosen once per load, after the handshake said how KV moves with that prefill engine
(decode/side.py): PullLoad (decode READs the prefill's blocks), PushLoad (the prefill WRITEs into
blocks decode announced), StagedLoad (either, in chunks through staging slots), ReshardLoad (the
prefill has another TP size: READ whole prefill blocks, keep this rank's heads).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load
from pdlaunch.kv_transfer.messages import ReadDone

logger = logging.getLogger(__name__)


class LoadStrategy(ABC):
    mode = ""  # "pull" | "push": what /info and error messages name
    # Seconds past the deadline before the engine thread fails a running load itself: a strategy that
    # enforces the deadline in its loader thread gets a grace that covers a stuck thread.
    deadline_grace = 0.0

    def __init__(self, ctx: LoadContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def run(self, load: Load) -> None:
        """Loader thread: move the load's bytes (or post the transfer that does); raises KVTransferError."""

    def progress(self, load: Load, now: float) -> None:  # noqa: B027 - an optional hook
        """Engine thread, lock held: advance a running load from what its transfer says."""

    def release_prefill(self, load: Load) -> None:  # noqa: B027 - an optional hook
        """The load failed or was aborted and nothing of it is read any more: tell the prefill side it
        may free its blocks (best effort: otherwise it frees them at its lease's end)."""

    def cancel_unsent(self, load: Load) -> None:  # noqa: B027 - an optional hook
        """The load failed before its push request was sent: let the prefill free at once."""

    def cancel(self, load: Load) -> None:  # noqa: B027 - an optional hook
        """Loader thread: a push this load sent may still WRITE; ask the prefill to drop it."""


class ReadsFromPrefill(LoadStrategy):
    """A strategy whose loads READ the prefill's memory: a failed one sends "release"."""

    mode = "pull"

    def release_prefill(self, load: Load) -> None:
        if load.remote_agent is None:
            return
        try:
            self.ctx.notify(load.remote_agent, ReadDone(kind="release", request_id=load.remote.held_request_id))
        except Exception as e:  # noqa: BLE001 - a NIXL error type per backend; the lease frees it anyway
            logger.debug("could not tell prefill to release request %s: %s", load.request_id, e)
