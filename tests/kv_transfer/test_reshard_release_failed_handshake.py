"""A resharding load (prefill TP 2 -> decode TP 1) whose handshake with one prefill rank fails sends a release
to every prefill rank it had planned to read from, best effort: a rank it shook hands with gets the release
notification (NIXL); a rank it did not (its handshake failed, or was never tried after an earlier rank's failed) gets
it on that rank's side channel ("release"), without a handshake: the prefill ranks' real hold tables behind real side
channels. Only the ranks already shaken hands with used to get one, then each of the others was shaken hands with
once more for it, which could keep the loader thread up to the handshake timeout on a rank that had just left a
handshake unanswered; a rank that does not answer the release now costs it RELEASE_TIMEOUT_SECONDS, and is logged
(its hold's lease frees the blocks). A load aborted while a rank leaves its handshake unanswered stops waiting for
it at once, and releases every rank the same way."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode.context import RELEASE_TIMEOUT_SECONDS, LoadContext
from pdlaunch.kv_transfer.decode.load import Load, load_id
from pdlaunch.kv_transfer.decode.loads import DecodeLoads
from pdlaunch.kv_transfer.decode.peers import PeerCache, RemoteEngine
from pdlaunch.kv_transfer.handshake import DeviceInfo, HandshakeInfo, compat_fields, compat_hash
from pdlaunch.kv_transfer.messages import Empty, HandshakeAnswer, HandshakeRequest, ReleaseRequest
from pdlaunch.kv_transfer.notifications import ReadDone, parse_notification
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.reshard import plan_reshard
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import make_spec, wait_releases_sent

SPEC = make_spec(groups=2)  # 2 KV heads per block: decode TP 1 reads both prefill ranks (1 head each)
LOGGER = "pdlaunch.kv_transfer.decode.context"
WAIT_S = 60.0  # generous for a loaded 2-core machine; the prefill ranks' leases: far longer than any test here


class _Agent:
    name = "decode-agent"
    device_id = 0
    release_cancels = True
    release_wait_seconds = 0.0
    release_wait_seconds_per_byte = 0.0

    def __init__(self) -> None:
        self.sent: list[tuple[str, ReadDone]] = []

    def notify(self, remote_agent: str, message: bytes) -> None:
        notif = parse_notification(message)
        assert isinstance(notif, ReadDone)
        self.sent.append((remote_agent, notif))


class _Peers:
    """The prefill ranks' handshakes: those of rank r fail failures[r] times, then succeed."""

    def __init__(self, failures: dict[int, int]) -> None:
        self.failures = failures
        self.tried: list[int] = []

    def get(self, remote: RemoteKV, stopped: Callable[[], bool] | None = None) -> RemoteEngine:
        rank = remote.tp_rank
        assert rank is not None
        self.tried.append(rank)
        if self.failures.get(rank, 0):
            self.failures[rank] -= 1
            raise KVTransferError(f"KV handshake with prefill engine P (TP rank {rank}) timed out after 1s")
        fields = compat_fields(SPEC)
        info = HandshakeInfo(
            engine_id="P", agent_name=f"prefill-agent-{rank}", agent_metadata="00", base_addrs=[1 << 20, 2 << 20],
            block_bytes=[b // 2 for b in SPEC.block_bytes], num_blocks=SPEC.num_blocks, block_size=SPEC.block_size,
            dtype=fields["dtype"], kv_layout=fields["kv_layout"], num_kv_heads=1, head_dim=SPEC.head_dim,
            group_layers=SPEC.group_layers, model_name=SPEC.model_name, tp_size=2, tp_rank=rank,
            device=DeviceInfo(type="cpu"), compat_hash=compat_hash(fields), staging_slots=4)
        return RemoteEngine(info, f"prefill-agent-{rank}", "pull", "test", ("10.0.0.9", 7000 + rank))


@dataclass
class _Rank:
    """One prefill rank: its real hold table (holding "p-1") behind its side channel, which serves "release" with the
    prefill's real handler; the releases that reached it."""

    holds: HoldTable
    server: SideChannelServer
    releases: list[ReleaseRequest]

    def freed(self) -> bool:
        """Poll the table as the prefill's engine thread does until it frees "p-1" (False after WAIT_S)."""
        until = time.monotonic() + WAIT_S
        while time.monotonic() < until:
            if "p-1" in self.holds.poll(time.monotonic()):
                return True
            time.sleep(0.01)
        return False


@pytest.fixture
def ranks() -> Iterator[list[_Rank]]:
    """Prefill ranks 0 and 1, each holding request p-1."""
    made: list[_Rank] = []
    for _ in range(2):
        holds = HoldTable(lease_seconds=WAIT_S)
        holds.hold("p-1", [[5, 6], [5, 6]])
        releases: list[ReleaseRequest] = []

        def release(message: ReleaseRequest, holds: HoldTable = holds, releases: list = releases) -> Empty:
            releases.append(message)
            return holds.on_release(message)

        made.append(_Rank(holds, SideChannelServer("127.0.0.1", 0, {"release": release}, KEYS), releases))
    try:
        yield made
    finally:
        for rank in made:
            rank.server.shutdown()
            rank.server.server_close()


def _reshard_load(agent: _Agent, peers: _Peers | PeerCache, executor: ThreadPoolExecutor, ranks: list[_Rank],
                  handshake_timeout: float) -> tuple[DecodeLoads, Load]:
    """The decode's loads and, in their table, a resharding load of request p-1 from both prefill ranks."""
    ctx = LoadContext(agent=cast(Any, agent), spec=lambda: SPEC, peers=cast(Any, peers), keys=KEYS,
                      handshake_timeout=handshake_timeout, transfer_timeout=WAIT_S, verify_kv=False,
                      executor=executor, reader="decode")
    loads = DecodeLoads(ctx)
    ports = [rank.server.port for rank in ranks]
    remote = RemoteKV(engine_id="P", request_id="p-1", host="127.0.0.1", port=ports[0], block_ids=[[5, 6], [5, 6]],
                      tp_size=2, kv_heads_per_rank=1, rank_ports=ports)
    now = time.monotonic()
    load = Load("r-1", remote, [[(0, 1, 5), (1, 2, 6)], [(0, 1, 5), (1, 2, 6)]], deadline=now + WAIT_S, started=now)
    load.reshard = plan_reshard(remote, SPEC.tp_rank, SPEC.tp_size, SPEC.num_kv_heads)
    loads.table.add(load)
    return loads, load


def _failed_load(agent: _Agent, peers: _Peers | PeerCache, executor: ThreadPoolExecutor, ranks: list[_Rank],
                 handshake_timeout: float = 1.0) -> str:
    """Run the resharding load through the loader and the engine thread's poll; the load's error."""
    loads, load = _reshard_load(agent, peers, executor, ranks, handshake_timeout)
    try:
        loads.run(load)
        wait_releases_sent(loads.ctx.releases, WAIT_S)  # a rank not shaken hands with: on a release thread
    finally:
        loads.ctx.releases.shutdown()
        loads.ctx.connections.close()
    finished, failed = loads.table.poll(time.monotonic())
    assert not finished and set(failed) == {"r-1"}
    return failed["r-1"]


def _released(agent: _Agent) -> list[str]:
    release = ReadDone(kind="release", request_id="p-1", reader="decode", load=load_id("r-1"), readers=1)
    assert all(n == release for _, n in agent.sent)
    return [peer for peer, _ in agent.sent]


def _side_channel_release(rank: _Rank) -> None:
    """Rank `rank` got exactly one release on its side channel, the one a release notification would carry."""
    [message] = rank.releases
    assert (message.request_id, message.reader, message.load, message.readers) == ("p-1", "decode", load_id("r-1"), 1)


def test_every_planned_rank_is_released_when_the_first_ranks_handshake_fails(ranks: list[_Rank]) -> None:
    """Rank 0's handshake times out (rank 1 is never tried by the load): neither is shaken hands with for its
    release, which each gets on its side channel, and each frees the request's blocks."""
    agent, peers = _Agent(), _Peers({0: 1})
    with ThreadPoolExecutor(max_workers=1) as executor:
        error = _failed_load(agent, peers, executor, ranks)
    assert "KV handshake with prefill engine P (TP rank 0) timed out" in error
    assert peers.tried == [0], "a handshake only for a release"
    assert _released(agent) == []
    for rank in ranks:
        _side_channel_release(rank)
        assert rank.freed()


def test_a_rank_whose_handshake_failed_gets_its_release_on_its_side_channel(ranks: list[_Rank]) -> None:
    """Rank 0 was shaken hands with: its release notification goes to its agent; rank 1's handshake failed."""
    agent, peers = _Agent(), _Peers({1: 1})
    with ThreadPoolExecutor(max_workers=1) as executor:
        _failed_load(agent, peers, executor, ranks)
    assert peers.tried == [0, 1]
    assert _released(agent) == ["prefill-agent-0"] and ranks[0].releases == []
    _side_channel_release(ranks[1])
    assert ranks[1].freed()


def test_a_rank_that_answers_neither_handshake_nor_release_is_asked_once_and_logged(
        ranks: list[_Rank], caplog: pytest.LogCaptureFixture) -> None:
    """The decode's real peer cache; rank 0's side channel takes requests and answers none (a stalled prefill):
    the load's handshake with it times out, and it is not shaken hands with again for its release, which gives up
    within RELEASE_TIMEOUT_SECONDS, logged, its hold left to its lease; rank 1 is released."""
    handshake_s = 3.0
    answer, handshakes = threading.Event(), []

    def stalled_handshake(message: HandshakeRequest) -> HandshakeAnswer:
        handshakes.append(message)
        assert answer.wait(WAIT_S), "the test never let the handshake answer"
        raise KVTransferError("answered after the test")

    def stalled_release(message: ReleaseRequest) -> Empty:
        ranks[0].releases.append(message)
        assert answer.wait(WAIT_S), "the test never let the release answer"
        return Empty()

    ranks[0].server.handlers.update(handshake=stalled_handshake, release=stalled_release)
    agent = _Agent()
    peers = PeerCache(cast(Any, agent), lambda: SPEC, lambda: DeviceInfo(type="cpu"), "pull", handshake_s, KEYS,
                      "decode")
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER), ThreadPoolExecutor(max_workers=1) as executor:
            started = time.monotonic()
            error = _failed_load(agent, peers, executor, ranks, handshake_timeout=handshake_s)
            took = time.monotonic() - started
    finally:
        answer.set()
    assert "no answer from the side channel" in error
    assert len(handshakes) == 1, "rank 0 was shaken hands with again for its release"
    _side_channel_release(ranks[0])
    assert handshake_s + RELEASE_TIMEOUT_SECONDS <= took < WAIT_S / 2
    [line] = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    port = ranks[0].server.port
    assert line.startswith(f"request r-1: kv_transfer.handshake_timeout_seconds: hold release of TP rank 0 to prefill "
                           f"engine P at 127.0.0.1:{port}: no answer from the side channel at 127.0.0.1:{port} within "
                           f"{RELEASE_TIMEOUT_SECONDS:g}s"), line
    assert "the prefill keeps the request's blocks until its hold's lease" in line
    assert ranks[0].holds.get("p-1") is not None  # its lease, WAIT_S here, frees it
    assert _released(agent) == []
    _side_channel_release(ranks[1])
    assert ranks[1].freed()


def test_a_load_aborted_while_a_rank_leaves_its_handshake_unanswered_stops_waiting(ranks: list[_Rank]) -> None:
    """The decode's real peer cache; rank 0 takes the handshake and answers only when the test ends; the load is
    aborted (its client left) while it waits: its loader thread stops waiting within a look at the abort
    (client.STOP_POLL_SECONDS), not the handshake timeout, and each rank gets its release on its side channel and
    frees the request's blocks. The handshake used to be waited out, whatever became of the load."""
    handshake_s = 600.0  # a load that waited it out would fail the test's own wait below
    asked, answer, handshakes = threading.Event(), threading.Event(), []

    def stalled_handshake(message: HandshakeRequest) -> HandshakeAnswer:
        handshakes.append(message)
        asked.set()
        assert answer.wait(2 * WAIT_S), "the test never let the handshake answer"
        raise KVTransferError("answered after the test")

    ranks[0].server.handlers["handshake"] = stalled_handshake
    agent = _Agent()
    peers = PeerCache(cast(Any, agent), lambda: SPEC, lambda: DeviceInfo(type="cpu"), "pull", handshake_s, KEYS,
                      "decode")
    with ThreadPoolExecutor(max_workers=1) as executor:
        loads, load = _reshard_load(agent, peers, executor, ranks, handshake_s)
        try:
            running = executor.submit(loads.run, load)
            assert asked.wait(WAIT_S), "the load never asked rank 0 for the handshake"
            assert not loads.table.abort("r-1")  # nothing READ yet: no drain
            aborted = time.monotonic()
            running.result(timeout=WAIT_S)
            took = time.monotonic() - aborted
        finally:
            answer.set()  # before the executor waits for its thread, should the load still wait
    wait_releases_sent(loads.ctx.releases, WAIT_S)  # the ranks not shaken hands with: on a release thread
    loads.ctx.releases.shutdown()
    loads.ctx.connections.close()
    assert took < WAIT_S / 2, f"the aborted load waited {took:.1f}s for its handshake"
    assert load.error == "aborted" and len(handshakes) == 1
    assert _released(agent) == []
    for rank in ranks:
        _side_channel_release(rank)
        assert rank.freed()
