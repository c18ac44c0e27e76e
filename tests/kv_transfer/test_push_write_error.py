"""A push whose WRITE (or a pull whose READ) fails: the error the decode reports gives the transport's
reason (Mooncake's error code, NIXL's error), not a fixed "failed in NIXL" / "NIXL READ" that was wrong
over Mooncake (and, for the push, said nothing of why)."""

from __future__ import annotations

import time
from typing import Any, cast

from pdlaunch.kv_transfer.decode.load import Load, LoadState
from pdlaunch.kv_transfer.decode.pull import PullLoad
from pdlaunch.kv_transfer.messages import PushRequest
from pdlaunch.kv_transfer.notifications import PushFailed, parse_notification
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.push_sender import PushSender
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from tests.kv_transfer.pd_procs import make_spec

REASON = "Mooncake WRITE of 512 bytes with 127.0.0.1:15000 failed (code -1, tcp)"


class _FailedWrite:
    num_bytes = 512
    error: str | None = REASON

    def state(self) -> str:
        return "ERR"

    def release(self) -> None:
        pass


class _Agent:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> _FailedWrite:
        return _FailedWrite()

    def notify(self, remote_agent: str, message: bytes) -> None:
        self.sent.append(message)


def test_a_failed_write_tells_the_decode_why() -> None:
    spec, agent, holds = make_spec(), _Agent(), HoldTable(lease_seconds=60.0)
    holds.hold("p-1", [[3, 4]])
    message = PushRequest(type="push", reader="d", request_id="p-1", nonce="a1b2c3d4e5f60718", owner="a1b2c3d4e5f60718",
                          agent_name="decode", agent_metadata="00", runs=[[(0, 3, 2)]], base_addrs=[4096],
                          block_bytes=spec.block_bytes, deadline_in=30.0)
    hold = holds.claim_push(message, spec, wait=0.0)
    assert hold is not None
    sender = PushSender(cast(Any, agent), holds, cast(Any, None), transfer_timeout=30.0)
    sender.spec = spec
    sender._push(hold, message, "decode-agent", time.monotonic())
    assert len(agent.sent) == 1
    notif = parse_notification(agent.sent[0])
    assert isinstance(notif, PushFailed) and notif.nonce == message.nonce
    assert notif.error.endswith(f"WRITE of 512 bytes for request p-1 failed: {REASON}")
    assert "NIXL" not in notif.error
    assert holds.poll(time.monotonic()) == {"p-1"}  # a failed push frees the prefill's blocks


def test_a_failed_mooncake_read_is_not_called_a_nixl_read() -> None:
    now = time.monotonic()
    load = Load("r", RemoteKV(engine_id="prefill-0", request_id="p", host="127.0.0.1", port=1), [],
                deadline=now + 5, started=now, state=LoadState.RUNNING)
    load.xfer = _FailedWrite()
    PullLoad(cast(Any, None), cast(Any, None)).progress(load, now)  # progress reads only the load
    assert load.state == LoadState.FAILED and load.error == f"READ of 512 bytes failed: {REASON}"
