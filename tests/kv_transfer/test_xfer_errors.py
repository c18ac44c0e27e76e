"""A transfer whose peer died mid-way fails its own load; the engine step that polls it goes on.

NIXL raises (NIXL_ERR_REMOTE_DISCONNECT) from check_xfer_state when the prefill is killed during a
decode's READ; that used to escape the engine step and end the decode instance (CI, 2P2D kill test)."""

from __future__ import annotations

import time

from pdlaunch.kv_transfer.agent import XferHandle
from pdlaunch.kv_transfer.decode.load import Load, LoadState
from pdlaunch.kv_transfer.decode.pull import PullLoad
from pdlaunch.kv_transfer.remote_kv import RemoteKV


class _RemoteGone:
    def __init__(self) -> None:
        self.polls = 0

    def check_xfer_state(self, handle: object) -> str:
        self.polls += 1
        raise RuntimeError("NIXL_ERR_REMOTE_DISCONNECT")


class _Agent:
    def __init__(self) -> None:
        self.nixl = _RemoteGone()


def _xfer(agent: _Agent) -> XferHandle:
    return XferHandle(agent, object(), "PROC", 4096)  # type: ignore[arg-type]  # a stand-in for KVAgent


def test_a_transfer_whose_peer_died_is_failed_not_raised() -> None:
    agent = _Agent()
    xfer = _xfer(agent)
    assert xfer.state() == "ERR" and xfer.error is not None and "NIXL_ERR_REMOTE_DISCONNECT" in xfer.error
    assert xfer.state() == "ERR" and agent.nixl.polls == 1  # an ended transfer is not asked again


def test_pull_load_fails_with_the_reason_when_its_read_raises() -> None:
    now = time.monotonic()
    remote = RemoteKV(engine_id="prefill-0", request_id="r", host="127.0.0.1", port=1)
    load = Load("r", remote, [], deadline=now + 5, started=now, state=LoadState.RUNNING)
    load.xfer = _xfer(_Agent())
    PullLoad(None, None).progress(load, now)  # type: ignore[arg-type]  # progress reads only the load
    assert load.state == LoadState.FAILED
    assert load.error is not None and "READ of 4096 bytes failed" in load.error
    assert "NIXL_ERR_REMOTE_DISCONNECT" in load.error
