"""What the roles need of a transport: one agent per engine process (agent.py's KVAgent over NIXL,
mooncake/agent.py's MooncakeAgent over Mooncake's TransferEngine) and its posted transfers.

The prefill and decode sides (prefill/, decode/) only see these protocols, so they run unchanged on
either transport.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Xfer(Protocol):
    """One posted READ or WRITE; `state()` is "PROC", "DONE" or "ERR"."""

    num_bytes: int
    error: str | None  # what failed, when known, once state() is "ERR"

    def state(self) -> str: ...

    def release(self) -> None: ...


class TransferAgent(Protocol):
    name: str
    device_id: int
    # How long a running WRITE may still land after its sender released it: 0 where release() cancels it
    # (NIXL); a transport that cannot cancel waits this long for it before the sender says push_failed.
    release_wait_seconds: float
    # ... and this much longer for each byte the WRITE moves (Mooncake's timeout grows with them; 0 for NIXL).
    release_wait_seconds_per_byte: float
    # Whether Xfer.release() stops a transfer that runs (NIXL). False (Mooncake): a running transfer goes on
    # until it ends or the transport's own timeout stops it, so the memory it writes stays taken until then.
    release_cancels: bool

    def register(self, kv_caches: list[torch.Tensor]) -> None: ...

    def deregister(self) -> None: ...

    def reregister(self, kv_caches: list[torch.Tensor]) -> None: ...

    def register_extra(self, tensors: list[torch.Tensor]) -> None: ...

    def metadata(self) -> bytes: ...

    def connection_metadata(self) -> bytes: ...

    def add_remote(self, metadata: bytes) -> str: ...

    def forget_remote(self, name: str) -> None: ...

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> Xfer: ...

    def notify(self, remote_agent: str, message: bytes) -> None: ...

    # the push_done of a push that moved no block: raises when it could not be delivered (the push fails)
    def push_done(self, remote_agent: str, message: bytes) -> None: ...

    def new_notifs(self) -> list[bytes]: ...

    def close(self) -> None: ...
