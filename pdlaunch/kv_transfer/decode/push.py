"""Push: decode announces its blocks ({"type": "push"} with this agent's metadata and block ids on the
side channel); the prefill side WRITEs them and its push_done/push_failed notification ends the load.
Works everywhere (UCX WRITEs where it cannot READ: GPUs without NVLink).

From the push request on, the prefill may WRITE into the load's blocks: a load that fails or is
aborted then drains (decode/table.py) until the prefill says nothing is in flight ("cancel_push").
"""

from __future__ import annotations

import logging
import threading
import uuid

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadStrategy
from pdlaunch.kv_transfer.messages import (
    CancelPushAnswer,
    CancelPushRequest,
    Empty,
    PushDone,
    PushFailed,
    PushRequest,
)

logger = logging.getLogger(__name__)


class ChunkWaits:
    """Staged pushes wait in their loader thread for each chunk's notification, keyed by its nonce."""

    def __init__(self) -> None:
        self._events: dict[str, tuple[threading.Event, list[str]]] = {}
        self._lock = threading.Lock()

    def open(self) -> tuple[str, threading.Event, list[str]]:
        nonce = uuid.uuid4().hex[:16]
        event, errors = threading.Event(), list[str]()
        with self._lock:
            self._events[nonce] = (event, errors)
        return nonce, event, errors

    def close(self, nonce: str) -> None:
        with self._lock:
            self._events.pop(nonce, None)

    def on_notif(self, notif: PushDone | PushFailed) -> bool:
        """True when the notification ended a chunk (its loader thread wakes up)."""
        with self._lock:
            chunk = self._events.pop(notif.nonce, None)
        if chunk is None:
            return False
        if isinstance(notif, PushFailed):
            chunk[1].append(f"the prefill side could not push: {notif.error}")
        chunk[0].set()
        return True


class PushLoad(LoadStrategy):
    mode = "push"

    def __init__(self, ctx: LoadContext, chunks: ChunkWaits) -> None:
        self.ctx = ctx
        self.chunks = chunks

    def run(self, load: Load) -> None:  # the prefill side builds the descriptors
        spec = self.ctx.spec()
        pairs = [[(p[1], p[2]) for p in group] for group in load.pairs]
        self.request(load, [t.data_ptr() for t in spec.kv_caches], pairs, spec, last=True)

    def request(self, load: Load, bases: list[int], pairs: list[list[tuple[int, int]]], spec: KVCacheSpec,
                last: bool, wait: bool = False) -> None:
        """Ask the prefill side to WRITE pairs [(my_id, its_block), ...] per group into `bases` (my blocks
        or staging slots). wait=True: block until its notification (staged chunks), else the engine
        thread sees it in poll."""
        nonce = load.nonce
        event: tuple[threading.Event, list[str]] | None = None
        remaining = self.ctx.remaining(load, "push request")
        with self.ctx.lock:
            if load.abandoned or load.state.ended:
                raise KVTransferError(f"push of request {load.request_id} not sent: {load.error or 'aborted'}")
            if wait:
                nonce, done, errors = self.chunks.open()
                event = (done, errors)
            else:
                load.push_sent = True  # from here on prefill may WRITE into our blocks: abort/fail drain
        message = PushRequest(
            type="push", request_id=load.remote.held_request_id, nonce=nonce, last=last, agent_name=self.ctx.agent.name,
            agent_metadata=self.ctx.agent.metadata().hex(), pairs=pairs, base_addrs=bases,
            block_bytes=spec.block_bytes, device_id=self.ctx.agent.device_id,
            deadline_in=remaining,  # prefill posts no WRITE after this (seconds from receipt)
        )
        try:
            self.ctx.ask(load.remote, message, Empty, remaining, "push request")
            if event is not None:
                if not event[0].wait(self.ctx.remaining(load, "push")):
                    self.ctx.remaining(load, "push")  # raises the timeout
                if event[1]:
                    raise KVTransferError(event[1][0])
        finally:
            if event is not None:
                self.chunks.close(nonce)

    def cancel_unsent(self, load: Load) -> None:
        if not load.push_sent:  # never asked: the prefill may free it now
            self.ctx.executor.submit(self.cancel, load)

    def cancel(self, load: Load) -> None:
        """Ask prefill to drop the push; no WRITE in flight ends the drain at once."""
        message = CancelPushRequest(type="cancel_push", request_id=load.remote.held_request_id, nonce=load.nonce)
        try:
            answer = self.ctx.ask(load.remote, message, CancelPushAnswer, self.ctx.handshake_timeout, "push cancel")
        except KVTransferError as e:  # the drain then ends by notification or at drain_until
            logger.warning("request %s: %s", load.request_id, e)
            return
        if not answer.in_flight:
            with self.ctx.lock:
                load.write_ended = True
