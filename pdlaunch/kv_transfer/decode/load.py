"""One KV load on the decode side: the record its strategy and the load table (decode/table.py) read
and advance (every field is guarded by the decode side's lock), and the interface of a strategy.

A strategy is how the bytes of one load move, chosen once per load in decode/loads.py after the
handshake said how KV moves with that prefill engine: PullLoad (pull.py: decode READs the prefill's
blocks), PushLoad (push.py: the prefill WRITEs into blocks decode announced), StagedLoad (staged.py:
either, in chunks through staging slots), ReshardLoad (reshard_load.py: the prefill has another TP
size: READ whole prefill blocks, keep this rank's heads). The strategies are siblings: what more than
one of them needs lives in decode/context.py. Each waits, before the first write into the load's blocks,
for the forwards the engine launched before the load (decode/compute_order.py).
"""

from __future__ import annotations

import hashlib
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.reshard import ReshardPlan
from pdlaunch.kv_transfer.transport import Xfer

Pairs = list[list[tuple[int, int, int]]]  # per group: (block-table index, local id, remote id)


def load_id(request_id: str) -> str:
    """Names the load of engine request `request_id` in its READ claims, stage requests and read_done/release
    notifications: the prefill counts them per (decode engine, load) (prefill/hold.py). A digest of the request id,
    which every TP rank of this decode shares (each rank's `Load.nonce` is its own), so the ranks of one resharding
    load count as one load, and two loads of the same params on one decode (a client replaying them, a leg retried
    there: two request ids) as two."""
    return hashlib.sha256(request_id.encode()).hexdigest()[:32]


class LoadState(Enum):
    HANDSHAKE = "handshake"  # waiting for the prefill engine's handshake (or its block ids)
    RUNNING = "running"  # its strategy moves the bytes
    OK = "ok"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (LoadState.OK, LoadState.FAILED)


class LoadStrategy(ABC):
    mode = ""  # "pull" | "push": what /info and error messages name
    # Seconds past the deadline before the engine thread fails a running load itself: a strategy that
    # enforces the deadline in its loader thread gets a grace that covers a stuck thread.
    deadline_grace = 0.0

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
        """Release thread (LoadContext.release_soon): a push this load sent may still WRITE; ask the prefill to drop
        it."""


@dataclass
class Load:
    request_id: str
    remote: RemoteKV
    pairs: Pairs
    deadline: float
    started: float
    # The first transfer of the load posted (a READ, or the push request the prefill WRITEs on), monotonic: the start
    # of its data movement (vllm:nixl_xfer_time_seconds); None before, or when nothing moved.
    posted: float | None = None
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    state: LoadState = LoadState.HANDSHAKE
    strategy: LoadStrategy | None = None  # chosen once, after the handshake said how KV moves
    xfer: Xfer | None = None  # a posted READ the engine thread polls (pull)
    read_posting: bool = False  # a READ into the load's blocks or slots is being posted (reads.py post_read)
    read_claimed: bool = False  # pull: the prefill answered the claim of its hold; the READ counts from then
    remote_agent: str | None = None
    num_bytes: int = 0
    error: str | None = None
    abandoned: bool = False
    push_sent: bool = False  # a push request (WRITE into the local blocks) may have reached prefill
    write_ended: bool = False  # prefill said no WRITE of this load is in flight any more
    drain_until: float = 0.0  # draining: blocks may be freed after this even without word from prefill
    held_past_drain: bool = False  # draining past drain_until: a READ that cannot be cancelled still runs
    reshard: ReshardPlan | None = None  # prefill has another TP size (decode/reshard_load.py)
    # Params without block ids (vLLM's push proxy): ask the prefill for them, then plan the pairs.
    plan: Callable[[RemoteKV], Pairs] | None = None
    prompt_digest: str = ""
    # Recorded on the compute stream by start_load (None on CPU): nothing writes the blocks before it completed
    # (compute_order.py). Set before the load reaches a loader thread, read there only.
    compute: torch.cuda.Event | None = None

    @property
    def where(self) -> str:
        return self.remote.where

    @property
    def load_id(self) -> str:
        return load_id(self.request_id)

    @property
    def mode(self) -> str:
        return self.strategy.mode if self.strategy is not None else ""

    def stopped(self) -> bool:
        """The load ended (failed, timed out) or was aborted: a wait of its loader thread gives up (the `stopped`
        of PeerCache.get and of the side channel's calls), and the thread goes back to other loads. Read without the
        lock: a stale False only delays the give-up by one look (client.STOP_POLL_SECONDS)."""
        return self.abandoned or self.state.ended

    def fail(self, error: str) -> None:
        """Mark the load failed unless it already ended (the lock is held)."""
        if not self.state.ended:
            self.state, self.error = LoadState.FAILED, error
