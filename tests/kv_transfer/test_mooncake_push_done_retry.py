"""Over Mooncake a push's WRITE sends its push_done from the transfer thread right after the bytes landed. A send
of it that fails once is tried once more before the WRITE counts as failed: the bytes are in the decode's
blocks, and a push_failed in its place (what the prefill's sender says of a failed WRITE) failed a request
whose KV was complete. A push_done that cannot be sent twice still fails the WRITE (test_notify_after_landing)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.messages import PushRequest
from pdlaunch.kv_transfer.mooncake.agent import MooncakeAgent, PeerMetadata
from pdlaunch.kv_transfer.mooncake.sender import TransferPool
from pdlaunch.kv_transfer.notifications import PushDone, parse_notification
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.push_sender import PushSender
from tests.kv_transfer.pd_procs import make_spec

MAC_HEX = 64
NONCE = "a1b2c3d4e5f60718"


class _Engine:
    """Every WRITE lands; the first notification's send fails, later ones are delivered."""

    protocol = "tcp"

    def __init__(self) -> None:
        self.writes = 0
        self.delivered: list[Any] = []
        self.failures = 1

    def transfer(self, op: str, session: str, local: list[tuple[int, int]], remote: list[tuple[int, int]]) -> None:
        self.writes += 1

    def notify(self, session: str, name: str, message: str) -> None:
        if self.failures:
            self.failures -= 1
            raise KVTransferError(f"Mooncake could not notify {session} (code -1)")
        self.delivered.append(parse_notification(message[MAC_HEX:].encode()))


@pytest.fixture
def pool() -> Iterator[TransferPool]:
    pool = TransferPool(0, workers=1)
    yield pool
    pool.shutdown()


def _push(pool: TransferPool, runs: list[list[tuple[int, int, int]]]) -> tuple[_Engine, PushSender, HoldTable]:
    """One push of request p-1's blocks `runs` through a prefill agent over `_Engine`, to its end (the notifier's
    queue, a push_failed the sender may have put there included)."""
    engine = _Engine()
    agent = MooncakeAgent("prefill-agent", cast(Any, engine), pool, "s" * 32)
    peer = agent.add_remote(PeerMetadata(name="decode-agent", session="10.0.0.7:17000",
                                         protocol="tcp").model_dump_json().encode())
    spec, holds = make_spec(), HoldTable(lease_seconds=60.0)
    holds.hold("p-1", [[3, 4]])
    message = PushRequest(type="push", reader="d", request_id="p-1", nonce=NONCE, owner=NONCE, agent_name="decode",
                          agent_metadata="00", runs=runs, base_addrs=[4096], block_bytes=spec.block_bytes,
                          deadline_in=30.0)
    hold = holds.claim_push(message, spec, wait=0.0)
    assert hold is not None
    sender = PushSender(cast(Any, agent), holds, cast(Any, None), transfer_timeout=30.0)
    sender.spec = spec
    sender._push(hold, message, peer, time.monotonic())
    agent._notifier.shutdown()
    return engine, sender, holds


def test_a_push_done_whose_first_send_fails_is_sent_again_and_the_push_succeeds(pool: TransferPool) -> None:
    engine, sender, holds = _push(pool, [[(0, 3, 2)]])
    assert engine.writes == 1
    assert engine.delivered == [PushDone(kind="push_done", nonce=NONCE)], "the decode is told the WRITE failed"
    assert [t.request_id for t in sender.timings()] == ["p-1"]  # the push completed
    assert holds.poll(time.monotonic()) == {"p-1"}


def test_the_push_done_of_a_push_of_nothing_is_sent_again_when_its_first_send_fails(pool: TransferPool) -> None:
    """A push that moves no block (1-token prompt, the decode's prefix cache has it all) sends its push_done alone:
    it went through the notifier, best effort, so a send that failed once was dropped and the decode waited for its
    deadline; it is tried twice, as a WRITE's push_done is."""
    engine, sender, holds = _push(pool, [[]])
    assert engine.writes == 0
    assert engine.delivered == [PushDone(kind="push_done", nonce=NONCE)]
