"""One KV load on the decode side: the record every loader strategy (pull, push, staged, resharded)
reads and advances. Its own module so that the strategies (nixl_receiver.py, reshard_load.py) share it
without importing each other.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdlaunch.kv_transfer.agent import XferHandle
from pdlaunch.kv_transfer.reshard import ReshardPlan


@dataclass
class Load:
    request_id: str
    params: dict[str, Any]
    pairs: list[list[tuple[int, int, int]]]  # per group: (block-table index, local id, remote id)
    deadline: float
    started: float
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    state: str = "handshake"  # handshake -> posted (pull) | pushing (push) | staging (staged) -> ok | failed
    mode: str = ""
    xfer: XferHandle | None = None
    remote_agent: str | None = None
    num_bytes: int = 0
    error: str | None = None
    abandoned: bool = False
    push_sent: bool = False  # a push request (WRITE into the local blocks) may have reached prefill
    write_ended: bool = False  # prefill said no WRITE of this load is in flight any more
    drain_until: float = 0.0  # draining: blocks may be freed after this even without word from prefill
    reshard: ReshardPlan | None = None  # prefill has another TP size (reshard_load.py)
    # Params without block ids (vLLM's push proxy): ask the prefill for them, then plan the pairs.
    plan: Callable[[dict[str, Any]], list[list[tuple[int, int, int]]]] | None = None
    prompt_digest: str = ""

    @property
    def where(self) -> str:
        p = self.params
        return f"prefill engine {p.get('remote_engine_id')} at {p.get('remote_host')}:{p.get('remote_port')}"
