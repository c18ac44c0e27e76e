"""A read_done (or release) the decode sends once a load's bytes are in is best effort: its send failing at
once (a Mooncake peer no longer known, a NIXL send that raises) is logged with the peer, the kind and what
its loss costs (the prefill keeps the blocks until its lease ends), and the load completes. It used to fail
the load, whose KV was complete: the request then failed or was computed again.

Driven through the decode side's load path (DecodeLoads.run, then the load table's poll) with a fake agent
whose READs complete at once and whose notify raises: pull with nothing to read, a staged pull through the
prefill's staging slots, and a resharding load (prefill TP 2 -> decode TP 1). Over Mooncake a READ's own
read_done leaves from its transfer thread: its loss must not turn the READ into a failure either (a WRITE's
push_done, the decode's only word that the bytes landed, still fails its WRITE)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, Pairs
from pdlaunch.kv_transfer.decode.loads import DecodeLoads
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.handshake import HandshakeInfo
from pdlaunch.kv_transfer.messages import Empty, StageAnswer, StageRequest
from pdlaunch.kv_transfer.mooncake.agent import MooncakeAgent, PeerMetadata
from pdlaunch.kv_transfer.mooncake.sender import TransferPool
from pdlaunch.kv_transfer.notifications import PushDone, encode_notification, parse_notification
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.reshard import plan_reshard
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import handshake_for, make_spec

SPEC = make_spec(groups=2)  # 2 KV heads per block
LOGGER = "pdlaunch.kv_transfer.decode.context"
WAIT_S = 30.0
ERRORS = [KVTransferError("Mooncake peer prefill-agent is not known here (no handshake yet, or it was forgotten)"),
          RuntimeError("NIXL_ERR_NOT_FOUND")]


class _Agent:
    """READs complete at once; every notification's send raises `error`."""

    name = "decode-agent"
    device_id = 0
    release_cancels = True
    release_wait_seconds = 0.0
    release_wait_seconds_per_byte = 0.0

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.reads = 0
        self.tried: list[tuple[str, str]] = []  # (peer, kind)

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> Any:
        self.reads += 1
        return SimpleNamespace(state=lambda: "DONE", release=lambda: None, num_bytes=sum(n for _, n in local),
                               error=None)

    def notify(self, remote_agent: str, message: bytes) -> None:
        notif = parse_notification(message)
        assert notif is not None
        self.tried.append((remote_agent, notif.kind))
        raise self.error

    def register_extra(self, tensors: list[Any]) -> None:
        pass


def _info(**overrides: Any) -> HandshakeInfo:
    """A handshake that fits SPEC, with `overrides`."""
    return handshake_for(SPEC, **overrides)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1)
    yield executor
    executor.shutdown(wait=True)


def _loads(agent: _Agent | MooncakeAgent, executor: ThreadPoolExecutor, remotes: dict[int | None, RemoteEngine],
           monkeypatch: pytest.MonkeyPatch) -> DecodeLoads:
    """The decode side's loads; the prefill ranks' side channels stage every block into slot order."""
    ctx = LoadContext(agent=cast(Any, agent), spec=lambda: SPEC, peers=cast(Any, None), keys=KEYS,
                      handshake_timeout=1.0, transfer_timeout=30.0, verify_kv=False, executor=executor,
                      reader="decode")
    ctx.peers = cast(Any, SimpleNamespace(get=lambda remote, stopped=None: remotes[remote.tp_rank]))

    def ask(remote: RemoteKV, message: Any, reply: type[Any], timeout: float, what: str) -> Any:
        if isinstance(message, StageRequest):
            return StageAnswer(ticket="t", slots=[list(range(len(ids))) for ids in message.blocks])
        return Empty()

    monkeypatch.setattr(ctx, "ask", ask)
    return DecodeLoads(ctx)


def _run(loads: DecodeLoads, pairs: Pairs, remote: RemoteKV | None = None) -> Load:
    """One load through the loader (handshake, strategy, run) and the engine thread's poll."""
    now = time.monotonic()
    remote = remote or RemoteKV(engine_id="P", request_id="p-1", host="10.0.0.9", port=7000,
                                block_ids=[[5, 6], [5, 6]])
    load = Load("r-1", remote, pairs, deadline=now + 30.0, started=now)
    if remote.tp_size != SPEC.tp_size:
        load.reshard = plan_reshard(remote, SPEC.tp_rank, SPEC.tp_size, SPEC.num_kv_heads)
    loads.table.add(load)
    loads.run(load)
    finished, failed = loads.table.poll(time.monotonic())
    assert (finished, failed) == ({"r-1"}, {}), load.error
    return load


def _lost(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def _assert_logged(line: str, peer: str, error: Exception) -> None:
    assert f"read_done notification to prefill agent {peer} not sent" in line, line
    assert str(error) in line
    assert "the prefill keeps the request's blocks until its hold's lease (kv_transfer.kv_lease_seconds)" in line


@pytest.mark.parametrize("error", ERRORS, ids=["mooncake", "nixl"])
def test_a_pull_with_nothing_to_read_completes_when_its_read_done_is_lost(
        executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        error: Exception) -> None:
    agent = _Agent(error)
    remote = RemoteEngine(_info(), "prefill-agent", "pull", "test", ("10.0.0.9", 7000))
    loads = _loads(agent, executor, {None: remote}, monkeypatch)
    with caplog.at_level(logging.WARNING):
        load = _run(loads, [[], []])  # a full prefix hit: nothing to read, the prefill still frees
    assert load.mode == "pull" and agent.reads == 0
    assert agent.tried == [("prefill-agent", "read_done")]
    [line] = _lost(caplog)
    _assert_logged(line, "prefill-agent", error)


@pytest.mark.parametrize("error", ERRORS, ids=["mooncake", "nixl"])
def test_a_staged_pull_completes_when_its_read_done_is_lost(
        executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        error: Exception) -> None:
    agent = _Agent(error)
    remote = RemoteEngine(_info(staging_slots=4), "prefill-agent", "pull", "test", ("10.0.0.9", 7000))
    loads = _loads(agent, executor, {None: remote}, monkeypatch)
    with caplog.at_level(logging.WARNING):
        _run(loads, [[(0, 1, 5), (1, 2, 6)], [(0, 1, 5), (1, 2, 6)]])
    assert agent.reads == 1 and agent.tried == [("prefill-agent", "read_done")]
    [line] = _lost(caplog)
    _assert_logged(line, "prefill-agent", error)


@pytest.mark.parametrize("error", ERRORS, ids=["mooncake", "nixl"])
def test_a_resharding_load_completes_when_its_read_dones_are_lost(
        executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        error: Exception) -> None:
    """Both prefill ranks (1 KV head each) are read; neither read_done arrives, and no release follows
    them (each rank gets one notification per request)."""
    agent = _Agent(error)
    half = [b // 2 for b in SPEC.block_bytes]
    remotes: dict[int | None, RemoteEngine] = {
        rank: RemoteEngine(_info(tp_size=2, tp_rank=rank, num_kv_heads=1, block_bytes=half, staging_slots=4,
                                 agent_name=f"prefill-agent-{rank}"), f"prefill-agent-{rank}", "pull", "test",
                           ("10.0.0.9", 7000 + rank))
        for rank in range(2)}
    loads = _loads(agent, executor, remotes, monkeypatch)
    remote = RemoteKV(engine_id="P", request_id="p-1", host="10.0.0.9", port=7000, block_ids=[[5, 6], [5, 6]],
                      tp_size=2, kv_heads_per_rank=1, rank_ports=[7000, 7001])
    with caplog.at_level(logging.WARNING):
        load = _run(loads, [[(0, 1, 5), (1, 2, 6)], [(0, 1, 5), (1, 2, 6)]], remote)
    assert load.reshard is not None and agent.reads == 2
    assert agent.tried == [("prefill-agent-0", "read_done"), ("prefill-agent-1", "read_done")]
    lines = _lost(caplog)
    assert len(lines) == 2, lines
    for rank, line in enumerate(lines):
        _assert_logged(line, f"prefill-agent-{rank}", error)


# -- Mooncake: the READ's own read_done, sent from its transfer thread right after the bytes ----------------
class _MooncakeEngine:
    """Every transfer lands; every notification fails with `error`."""

    protocol = "tcp"

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.transfers: list[str] = []

    def transfer(self, op: str, session: str, local: list[tuple[int, int]], remote: list[tuple[int, int]]) -> None:
        self.transfers.append(op)

    def notify(self, session: str, name: str, message: str) -> None:
        raise self.error


@pytest.fixture
def pool() -> Iterator[TransferPool]:
    pool = TransferPool(0, workers=1)
    yield pool
    pool.shutdown()


def _mooncake(error: Exception, pool: TransferPool) -> tuple[MooncakeAgent, _MooncakeEngine]:
    engine = _MooncakeEngine(error)
    agent = MooncakeAgent("decode-agent", cast(Any, engine), pool, "s" * 32)
    agent.add_remote(PeerMetadata(name="prefill-agent", session="10.0.0.9:17000",
                                  protocol="tcp").model_dump_json().encode())
    return agent, engine


def _ended(loads: DecodeLoads) -> tuple[set[str], dict[str, str]]:
    """Poll the load table until the load ended, at most WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not any(ended := loads.table.poll(time.monotonic())):
        assert time.monotonic() < deadline, f"the load did not end within {WAIT_S}s"
        time.sleep(0.01)
    return ended


@pytest.mark.parametrize("error", [KVTransferError("Mooncake could not notify 10.0.0.9:17000 (code -1)"),
                                   RuntimeError("engine closed")], ids=["refused", "raised"])
def test_a_mooncake_pull_completes_when_its_reads_read_done_is_lost(
        executor: ThreadPoolExecutor, pool: TransferPool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, error: Exception) -> None:
    agent, engine = _mooncake(error, pool)
    remote = RemoteEngine(_info(), "prefill-agent", "pull", "test", ("10.0.0.9", 7000))
    loads = _loads(agent, executor, {None: remote}, monkeypatch)
    monkeypatch.setattr(loads.ctx, "send_claim_read", lambda load, remote: SimpleNamespace(answer=lambda t: t()))
    now = time.monotonic()
    load = Load("r-1", RemoteKV(engine_id="P", request_id="p-1", host="10.0.0.9", port=7000,
                                block_ids=[[5, 6], [5, 6]]),
                [[(0, 1, 5), (1, 2, 6)], [(0, 1, 5)]], deadline=now + WAIT_S, started=now)
    loads.table.add(load)
    with caplog.at_level(logging.WARNING, logger="pdlaunch.kv_transfer.mooncake.agent"):
        loads.run(load)
        assert _ended(loads) == ({"r-1"}, {}), load.error
    assert load.mode == "pull" and engine.transfers == ["READ"]
    [line] = [r.getMessage() for r in caplog.records]
    assert "Mooncake read_done notification to prefill-agent (session 10.0.0.9:17000) not delivered" in line
    assert str(error) in line and "until its hold's lease (kv_transfer.kv_lease_seconds)" in line


def test_a_mooncake_write_whose_push_done_is_lost_fails(pool: TransferPool) -> None:
    """push_done is how the decode learns that the WRITE landed: when it cannot be sent (a second send fails
    too), the push failed."""
    agent, engine = _mooncake(RuntimeError("engine closed"), pool)
    xfer = agent.transfer("WRITE", [(1 << 16, 64)], [(1 << 20, 64)], "prefill-agent", 0,
                          encode_notification(PushDone(kind="push_done", nonce="n-1")))
    deadline = time.monotonic() + WAIT_S
    while (state := xfer.state()) == "PROC":
        assert time.monotonic() < deadline, f"the WRITE did not end within {WAIT_S}s"
        time.sleep(0.01)
    assert engine.transfers == ["WRITE"]
    assert state == "ERR" and xfer.error == "RuntimeError: engine closed"
