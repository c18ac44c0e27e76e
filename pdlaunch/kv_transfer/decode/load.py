"""One KV load on the decode side: the record its strategy (decode/strategy.py) and the load table
(decode/table.py) read and advance. Every field is guarded by the decode side's lock."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.reshard import ReshardPlan
from pdlaunch.kv_transfer.transport import Xfer

if TYPE_CHECKING:
    from pdlaunch.kv_transfer.decode.strategy import LoadStrategy

Pairs = list[list[tuple[int, int, int]]]  # per group: (block-table index, local id, remote id)


class LoadState(Enum):
    HANDSHAKE = "handshake"  # waiting for the prefill engine's handshake (or its block ids)
    RUNNING = "running"  # its strategy moves the bytes
    OK = "ok"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (LoadState.OK, LoadState.FAILED)


@dataclass
class Load:
    request_id: str
    remote: RemoteKV
    pairs: Pairs
    deadline: float
    started: float
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    state: LoadState = LoadState.HANDSHAKE
    strategy: LoadStrategy | None = None  # chosen once, after the handshake said how KV moves
    xfer: Xfer | None = None  # a posted READ the engine thread polls (pull)
    remote_agent: str | None = None
    num_bytes: int = 0
    error: str | None = None
    abandoned: bool = False
    push_sent: bool = False  # a push request (WRITE into the local blocks) may have reached prefill
    write_ended: bool = False  # prefill said no WRITE of this load is in flight any more
    drain_until: float = 0.0  # draining: blocks may be freed after this even without word from prefill
    reshard: ReshardPlan | None = None  # prefill has another TP size (decode/reshard_load.py)
    # Params without block ids (vLLM's push proxy): ask the prefill for them, then plan the pairs.
    plan: Callable[[RemoteKV], Pairs] | None = None
    prompt_digest: str = ""

    @property
    def where(self) -> str:
        return self.remote.where

    @property
    def mode(self) -> str:
        return self.strategy.mode if self.strategy is not None else ""

    def fail(self, error: str) -> None:
        """Mark the load failed unless it already ended (the lock is held)."""
        if not self.state.ended:
            self.state, self.error = LoadState.FAILED, error
