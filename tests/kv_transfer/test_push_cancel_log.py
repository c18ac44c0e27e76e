"""A push the decode cancelled (cancel_push) before its WRITE was posted ends with push_failed to the decode, as
before, but is logged at INFO: an expected end, not the ERROR ("push ... failed") it used to be. A push that
really failed (its WRITE in error, or decode's deadline passed first) is still an ERROR."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.kv_transfer.messages import CancelPushAnswer, CancelPushRequest, PushRequest
from pdlaunch.kv_transfer.notifications import PushFailed, parse_notification
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.push_sender import PushSender
from tests.kv_transfer.pd_procs import make_spec

LOGGER = "pdlaunch.kv_transfer.prefill.push_sender"
NONCE = "a1b2c3d4e5f60718"


class _Agent:
    """Records notifications; a WRITE ends in `state`."""

    def __init__(self, state: str = "DONE") -> None:
        self.state = state
        self.sent: list[bytes] = []
        self.writes = 0

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> Any:
        self.writes += 1
        return SimpleNamespace(state=lambda: self.state, release=lambda: None, num_bytes=sum(n for _, n in local),
                               error="UCX_ERR_CONNECTION_RESET" if self.state == "ERR" else None)

    def notify(self, remote_agent: str, message: bytes) -> None:
        self.sent.append(message)


def _push(agent: _Agent, cancel: bool, deadline_in: float = 30.0) -> HoldTable:
    spec, holds = make_spec(), HoldTable(lease_seconds=60.0)
    holds.hold("p-1", [[3, 4]])
    message = PushRequest(type="push", reader="d", request_id="p-1", nonce=NONCE, owner=NONCE, agent_name="decode",
                          agent_metadata="00", runs=[[(0, 3, 2)]], base_addrs=[4096], block_bytes=spec.block_bytes,
                          deadline_in=deadline_in)
    hold = holds.claim_push(message, spec, wait=0.0)
    assert hold is not None
    if cancel:  # the decode gave up while the push waited for a sender thread
        answer = holds.cancel_push(CancelPushRequest(type="cancel_push", request_id="p-1", owner=NONCE))
        assert answer == CancelPushAnswer(in_flight=True)
    sender = PushSender(cast(Any, agent), holds, cast(Any, None), transfer_timeout=30.0)
    sender.spec = spec
    sender._push(hold, message, "decode-agent", time.monotonic())
    return holds


def _failed(agent: _Agent) -> PushFailed:
    [notif] = [parse_notification(n) for n in agent.sent]
    assert isinstance(notif, PushFailed)
    return notif


def test_a_cancelled_push_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    agent = _Agent()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        holds = _push(agent, cancel=True)
    assert agent.writes == 0 and "cancelled" in _failed(agent).error  # the decode still hears that it ended
    records = [r for r in caplog.records if r.name == LOGGER]
    assert [r.levelno for r in records] == [logging.INFO], [r.getMessage() for r in records]
    assert "push of request p-1 cancelled" in records[0].getMessage()
    assert holds.poll(time.monotonic()) == {"p-1"}


@pytest.mark.parametrize("state, deadline_in, why", [("ERR", 30.0, "UCX_ERR_CONNECTION_RESET"),
                                                     ("DONE", 0.0, "decode's deadline passed first")],
                         ids=["write-error", "past-deadline"])
def test_a_push_that_failed_is_logged_at_error(caplog: pytest.LogCaptureFixture, state: str, deadline_in: float,
                                               why: str) -> None:
    agent = _Agent(state)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        _push(agent, cancel=False, deadline_in=deadline_in)
    assert why in _failed(agent).error
    records = [r for r in caplog.records if r.name == LOGGER]
    assert [r.levelno for r in records] == [logging.ERROR], [r.getMessage() for r in records]
    assert records[0].getMessage().startswith("push of request p-1 failed: ")
