"""Decode-side load strategies: how the bytes of one load move (the interface: load.LoadStrategy).

Chosen once per load, after the handshake said how KV moves with that prefill engine
(decode/side.py): PullLoad (decode READs the prefill's blocks), PushLoad (the prefill WRITEs into
blocks decode announced), StagedLoad (either, in chunks through staging slots), ReshardLoad (the
prefill has another TP size: READ whole prefill blocks, keep this rank's heads).
"""

from __future__ import annotations

import logging

from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadStrategy
from pdlaunch.kv_transfer.messages import ReadDone

logger = logging.getLogger(__name__)


class ReadsFromPrefill(LoadStrategy):
    """A strategy whose loads READ the prefill's memory: a failed one sends "release"."""

    mode = "pull"

    def __init__(self, ctx: LoadContext) -> None:
        self.ctx = ctx

    def release_prefill(self, load: Load) -> None:
        if load.remote_agent is None:
            return
        try:
            self.ctx.notify(load.remote_agent, ReadDone(kind="release", request_id=load.remote.held_request_id))
        except Exception as e:  # noqa: BLE001 - a NIXL error type per backend; the lease frees it anyway
            logger.debug("could not tell prefill to release request %s: %s", load.request_id, e)
