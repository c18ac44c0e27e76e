"""A staged push the decode cancels ("cancel_push": abort, timeout) while one of its chunks' WRITE is in flight:
the prefill answers in_flight, the WRITE lands, and the hold is freed as soon as that sender thread ends, as a
cancel with nothing in flight frees it at once. It used to stay held until its lease ran out (the chunk was not
the last one, so its end did not mark the hold done), and was then counted and logged as a lease expiry."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.kv_transfer.messages import CancelPushAnswer, CancelPushRequest, PushRequest
from pdlaunch.kv_transfer.notifications import PushDone, parse_notification
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.push_sender import PushSender
from pdlaunch.metrics.kv_transfer import KV_EXPIRED_REQUESTS
from tests.kv_transfer.pd_procs import make_spec

LEASE_S = 60.0
NONCE = "a1b2c3d4e5f60718"  # the chunk's
LOAD = "0123456789abcdef"  # the nonce of the decode's load: its chunks' owner


class _Agent:
    """Each WRITE lands at once; the decode's cancel_push reaches the prefill while it is in flight."""

    def __init__(self, holds: HoldTable) -> None:
        self.holds = holds
        self.answers: list[CancelPushAnswer] = []
        self.sent: list[bytes] = []

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> Any:
        self.answers.append(self.holds.cancel_push(CancelPushRequest(type="cancel_push", request_id="p-1",
                                                                     owner=LOAD)))
        self.sent.append(notif)  # NIXL hands push_done over with the WRITE
        return SimpleNamespace(state=lambda: "DONE", release=lambda: None, num_bytes=sum(n for _, n in local),
                               error=None)


def test_a_chunk_cancelled_while_its_write_runs_frees_the_hold_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    spec, holds = make_spec(), HoldTable(lease_seconds=LEASE_S)
    holds.hold("p-1", [[3, 4, 5, 6]])
    agent = _Agent(holds)
    message = PushRequest(type="push", reader="d", request_id="p-1", nonce=NONCE, owner=LOAD, last=False,
                          agent_name="decode", agent_metadata="00", runs=[[(0, 3, 2)]], base_addrs=[4096],
                          block_bytes=spec.block_bytes, deadline_in=30.0)  # the first of two chunks
    hold = holds.claim_push(message, spec, wait=0.0)
    assert hold is not None
    sender = PushSender(cast(Any, agent), holds, cast(Any, None), transfer_timeout=30.0)
    sender.spec = spec
    expired = KV_EXPIRED_REQUESTS._value.get()
    with caplog.at_level(logging.WARNING, logger="pdlaunch.kv_transfer.prefill.holds"):
        sender._push(hold, message, "decode-agent", time.monotonic())
        assert agent.answers == [CancelPushAnswer(in_flight=True)]  # the decode waits for the chunk's push_done
        assert [parse_notification(n) for n in agent.sent] == [PushDone(kind="push_done", nonce=NONCE)]
        assert holds.poll(time.monotonic()) == {"p-1"}, "held until its lease although no WRITE will follow"
    assert KV_EXPIRED_REQUESTS._value.get() == expired
    assert not [r.getMessage() for r in caplog.records if "lease" in r.getMessage()]
