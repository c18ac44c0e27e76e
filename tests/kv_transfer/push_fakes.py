"""What the HoldTable push tests share: a NIXL agent whose every WRITE lands at once, a table holding one request's
blocks, and a push chunk of that request from one decode load (`owner`)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.messages import PushRequest
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from tests.kv_transfer.pd_procs import make_spec

LEASE_S = 60.0


class LandingAgent:
    """Every WRITE lands at once; records each notification it sent as (peer, notification)."""

    def __init__(self) -> None:
        self.writes = 0
        self.sent: list[tuple[str, bytes]] = []

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> Any:
        self.writes += 1
        self.sent.append((remote_agent, notif))  # NIXL hands push_done over with the WRITE
        return SimpleNamespace(state=lambda: "DONE", release=lambda: None, num_bytes=sum(n for _, n in local),
                               error=None)

    def notify(self, peer: str, message: bytes) -> None:
        self.sent.append((peer, message))


def held_table() -> tuple[KVCacheSpec, HoldTable]:
    """A table holding request p-1's blocks 3-6 for LEASE_S, and the spec its pushes use."""
    holds = HoldTable(lease_seconds=LEASE_S)
    holds.hold("p-1", [[3, 4, 5, 6]])
    return make_spec(), holds


def push_chunk(spec: KVCacheSpec, owner: str, nonce: str, last: bool, start: int = 3, reader: str = "d") -> PushRequest:
    """A push of two of p-1's blocks from `start` by decode load `owner` of decode engine `reader`; `last`: the
    push's last chunk."""
    return PushRequest(type="push", reader=reader, request_id="p-1", nonce=nonce, owner=owner, last=last,
                       agent_name="decode", agent_metadata="00", runs=[[(0, start, 2)]], base_addrs=[4096],
                       block_bytes=spec.block_bytes, deadline_in=30.0)
