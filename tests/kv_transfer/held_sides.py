"""A prefill's hold table behind a real side channel that answers "held_blocks" (the prefill's real handler) and
"drop_held", and a decode's loads that ask it: for the tests of vLLM push-proxy params (no block ids)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load
from pdlaunch.kv_transfer.decode.loads import DecodeLoads
from pdlaunch.kv_transfer.messages import DropHeldRequest, Empty, HeldBlocksAnswer, HeldBlocksRequest
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.side import PrefillSide
from pdlaunch.kv_transfer.push_params import prompt_digest
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
from tests.kv_transfer.deployment_secret import KEYS

PROMPT = list(range(100, 120))
LEASE_S = 60.0


@dataclass
class HeldSides:
    holds: HoldTable  # the prefill's
    asks: list[HeldBlocksRequest]
    drops: list[DropHeldRequest]
    loads: DecodeLoads
    server: SideChannelServer

    def load(self, seconds: float) -> Load:
        """A load of PROMPT by the client's X-Request-Id "client-1" (no request id, no blocks), `seconds` to its
        deadline."""
        now = time.monotonic()
        remote = RemoteKV(engine_id="P", request_id=None, host="127.0.0.1", port=self.server.port)
        load = Load("client-1-0a1b2c3d", remote, [], deadline=now + seconds, started=now)
        load.plan = lambda remote: [[(0, 9, (remote.block_ids or [[]])[0][0])]]
        load.prompt_digest = prompt_digest(PROMPT)
        return load


@contextmanager
def held_sides(wait_s: float) -> Iterator[HeldSides]:
    """The prefill's transfer timeout, and the decode's handshake and transfer timeouts, are `wait_s`."""
    holds = HoldTable(lease_seconds=LEASE_S)
    prefill = SimpleNamespace(holds=holds, kv=SimpleNamespace(transfer_timeout_seconds=wait_s), kv_epoch=0)
    asks: list[HeldBlocksRequest] = []
    drops: list[DropHeldRequest] = []

    def held_blocks(message: HeldBlocksRequest) -> HeldBlocksAnswer:
        asks.append(message)
        return PrefillSide._on_held_blocks(cast(Any, prefill), message)  # noqa: SLF001 - its real handler

    def drop_held(message: DropHeldRequest) -> Empty:
        drops.append(message)
        return holds.drop_held(message)

    server = SideChannelServer("127.0.0.1", 0, {"held_blocks": held_blocks, "drop_held": drop_held}, KEYS)
    executor = ThreadPoolExecutor(max_workers=1)
    ctx = LoadContext(agent=cast(Any, None), spec=cast(Any, None), peers=cast(Any, None), keys=KEYS,
                      handshake_timeout=wait_s, transfer_timeout=wait_s, verify_kv=False, executor=executor,
                      reader="decode")
    try:
        yield HeldSides(holds, asks, drops, DecodeLoads(ctx), server)
    finally:
        executor.shutdown(wait=True)
        ctx.releases.shutdown()
        ctx.connections.close()
        server.shutdown()
        server.server_close()
