"""A Mooncake transfer of several pieces (one descriptor per block run and KV-cache group) where one piece fails:
the transfer ends ("ERR") only once none of its other pieces still lands.

Mooncake 0.3.13's batch_transfer_sync_* return -1 as soon as one piece of the batch failed, while the others
still run (measured over TCP: 64 MiB pieces, the call returned in 0.04 s with 2.6 MB of the good pieces still to
land). The prefill then said push_failed (or the decode failed its READ) and the decode freed blocks that those
pieces went on writing, under another request."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.mooncake import engine as mooncake_engine
from pdlaunch.kv_transfer.mooncake.agent import MooncakeAgent
from pdlaunch.kv_transfer.mooncake.engine import MooncakeEngine
from pdlaunch.kv_transfer.mooncake.sender import TransferPool
from tests.kv_transfer.deployment_secret import TEST_SECRET
from tests.kv_transfer.mooncake_skip import requires_mooncake

PIECE = 32 << 20  # large enough that the good pieces are still moving when the bad one is refused
PIECES = 4


@pytest.fixture
def agents() -> Iterator[tuple[MooncakeAgent, MooncakeAgent]]:
    ours = MooncakeAgent("ours", MooncakeEngine("127.0.0.1", "tcp", None), TransferPool(0, workers=1), TEST_SECRET)
    peer = MooncakeAgent("peer", MooncakeEngine("127.0.0.1", "tcp", None), TransferPool(0, workers=1), TEST_SECRET)
    ours.add_remote(peer.metadata())
    try:
        yield ours, peer
    finally:
        ours.close()
        peer.close()


@requires_mooncake
@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_a_failed_piece_ends_the_transfer_only_once_the_others_landed(
        agents: tuple[MooncakeAgent, MooncakeAgent], op: str) -> None:
    ours, peer = agents
    local = torch.full((PIECES * PIECE,), 7 if op == "WRITE" else 0, dtype=torch.uint8)
    remote = torch.full((PIECES * PIECE,), 0 if op == "WRITE" else 7, dtype=torch.uint8)
    unregistered = torch.zeros(PIECE, dtype=torch.uint8)  # the peer refuses a piece that names it
    ours.register([local])
    peer.register([remote])
    landing = remote if op == "WRITE" else local  # where the good pieces' bytes go
    pieces = [(local.data_ptr() + i * PIECE, PIECE) for i in range(PIECES)]
    peer_pieces = [(remote.data_ptr() + i * PIECE, PIECE) for i in range(PIECES - 1)]
    peer_pieces.append((unregistered.data_ptr(), PIECE))
    xfer = ours.transfer(op, pieces, peer_pieces, "peer", 0, b"")
    deadline = time.monotonic() + 120.0
    while (state := xfer.state()) == "PROC" and time.monotonic() < deadline:
        time.sleep(0.0005)
    landed = int(landing[: (PIECES - 1) * PIECE].count_nonzero())  # the moment the caller may free the memory
    assert state == "ERR" and xfer.error is not None
    assert landed == (PIECES - 1) * PIECE, f"{(PIECES - 1) * PIECE - landed} bytes of the good pieces still to land"
    assert f"{op} of {PIECES * PIECE} bytes" in xfer.error and "1 of 4 pieces failed" in xfer.error, xfer.error


class _Batches:
    """Mooncake's engine as `MooncakeEngine.transfer` drives it: batch ids, and each batch's status polls."""

    def __init__(self, statuses: dict[int, list[int]], refused: int = 0) -> None:
        self.statuses = statuses  # peer address -> what successive transfer_check_status calls answer
        self.refused = refused  # this peer address is refused at submission (batch id 0)
        self.polls: dict[int, int] = {}
        self.submitted: list[int] = []

    def batch_transfer_async_write(self, session: str, local: list[int], peer: list[int], lengths: list[int]) -> int:
        self.submitted.append(peer[0])
        return 0 if peer == [self.refused] else peer[0]

    def transfer_check_status(self, batch: int) -> int:
        self.polls[batch] = self.polls.get(batch, 0) + 1
        answers = self.statuses[batch]
        return answers.pop(0) if len(answers) > 1 else answers[0]


def _engine(batches: _Batches) -> MooncakeEngine:
    engine = MooncakeEngine.__new__(MooncakeEngine)  # no TransferEngine: `transfer` only talks to `engine`
    engine.engine, engine.protocol = batches, "tcp"
    return engine


def test_a_refused_piece_waits_for_the_others_then_fails() -> None:
    batches = _Batches({1: [0, 0, 0, 1], 3: [1]}, refused=2)
    with pytest.raises(KVTransferError, match=r"WRITE of 96 bytes with peer:1 failed: 2 of 3 pieces failed"):
        _engine(batches).transfer("WRITE", "peer:1", [(10, 32), (20, 32), (30, 32)], [(1, 32), (2, 32), (3, 32)])
    assert batches.polls == {1: 4}  # polled to its end, not given up at the refusal
    assert batches.submitted == [1, 2]  # none after the refusal: the peer is likely unreachable for them too


def test_a_piece_still_running_past_mooncakes_timeout_and_the_grace_fails_the_transfer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mooncake_engine, "mooncake_transfer_timeout", lambda environ: 0.2)
    monkeypatch.setattr(mooncake_engine, "_TIMEOUT_GRACE_SECONDS", 0.6)
    batches = _Batches({1: [1], 2: [0]})
    started = time.monotonic()
    with pytest.raises(KVTransferError, match=r"1 of 2 pieces did not end within 1s") as e:
        _engine(batches).transfer("WRITE", "peer:1", [(10, 32), (20, 32)], [(1, 32), (2, 32)])
    assert time.monotonic() - started >= 0.8  # given the grace, not failed at the timeout itself
    assert "MC_TRANSFER_TIMEOUT" in e.value.render()


class _EndsLate(_Batches):
    """Batch 2 runs until `ends_at` (monotonic), then answers `code`."""

    def __init__(self, ends_at: float, code: int) -> None:
        super().__init__({1: [1]})
        self.ends_at, self.code = ends_at, code

    def transfer_check_status(self, batch: int) -> int:
        if batch == 2:
            self.polls[2] = self.polls.get(2, 0) + 1
            return 0 if time.monotonic() < self.ends_at else self.code
        return super().transfer_check_status(batch)


@pytest.mark.parametrize("code", [1, -2])
def test_a_piece_running_at_the_timeout_is_polled_until_mooncake_ends_it(
        monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """At the timeout a piece may still move bytes (Mooncake's own timeout for it counts from a moment later):
    the transfer returns only once Mooncake ended it, so the caller never frees memory it still writes, and a
    piece that landed makes the transfer a success."""
    monkeypatch.setattr(mooncake_engine, "mooncake_transfer_timeout", lambda environ: 0.2)
    monkeypatch.setattr(mooncake_engine, "_TIMEOUT_GRACE_SECONDS", 30.0)
    batches = _EndsLate(time.monotonic() + 0.6, code)
    pieces, peer_pieces = [(10, 32), (20, 32)], [(1, 32), (2, 32)]
    if code == 1:
        _engine(batches).transfer("WRITE", "peer:1", pieces, peer_pieces)
    else:
        with pytest.raises(KVTransferError, match=r"failed: 1 of 2 pieces failed"):
            _engine(batches).transfer("WRITE", "peer:1", pieces, peer_pieces)
    assert time.monotonic() >= batches.ends_at  # returned only once the piece ended
