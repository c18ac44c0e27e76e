"""A Mooncake READ's read_done leaves once its bytes are in, but the READ counts as done without waiting for that
send: a prefill that does not answer holds a notification for Mooncake's handshake timeout (61 s measured with
0.3.13 for a port that accepts but never answers). The READ used to stay "PROC" until its read_done was sent, so
a load whose KV had landed ran past its deadline and failed (and held one of the transfer pool's threads)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from pdlaunch.kv_transfer.mooncake.agent import MooncakeAgent, PeerMetadata
from pdlaunch.kv_transfer.mooncake.sender import TransferPool
from pdlaunch.kv_transfer.notifications import ReadDone, encode_notification, parse_notification

WAIT_S = 30.0
MAC_HEX = 64
SESSION = "10.0.0.9:17000"


class _Engine:
    """READs land at once; a notification's send blocks until `answer` is set (a prefill that does not answer)."""

    protocol = "tcp"

    def __init__(self) -> None:
        self.answer = threading.Event()
        self.events: list[str] = []

    def transfer(self, op: str, session: str, local: list[tuple[int, int]], remote: list[tuple[int, int]]) -> None:
        self.events.append(op)

    def notify(self, session: str, name: str, message: str) -> None:
        assert self.answer.wait(WAIT_S), "the test never let the prefill answer"
        notif = parse_notification(message[MAC_HEX:].encode())
        assert notif is not None
        self.events.append(notif.kind)


@pytest.fixture
def pool() -> Iterator[TransferPool]:
    pool = TransferPool(0, workers=1)
    yield pool
    pool.shutdown()


def test_a_read_is_done_once_its_bytes_landed_while_its_read_done_still_leaves(pool: TransferPool) -> None:
    engine = _Engine()
    agent = MooncakeAgent("decode-agent", cast(Any, engine), pool, "s" * 32)
    agent.add_remote(PeerMetadata(name="prefill-agent", session=SESSION, protocol="tcp").model_dump_json().encode())
    notif = encode_notification(ReadDone(load="load-0", kind="read_done", request_id="p-1", reader="D"))
    try:
        xfer = agent.transfer("READ", [(4096, 64)], [(8192, 64)], "prefill-agent", 0, notif)
        deadline = time.monotonic() + WAIT_S
        while (state := xfer.state()) == "PROC":
            assert time.monotonic() < deadline, f"the READ did not end within {WAIT_S}s while its read_done waited"
            time.sleep(0.005)
        assert state == "DONE", xfer.error
        assert engine.events == ["READ"]
    finally:
        engine.answer.set()
    agent._notifier.shutdown()
    assert engine.events == ["READ", "read_done"]
