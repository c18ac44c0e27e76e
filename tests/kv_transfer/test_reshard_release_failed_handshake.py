"""A resharding load (prefill TP 2 -> decode TP 1) whose handshake with one prefill rank fails sends a release
to every prefill rank it had planned to read from, best effort: the rank whose handshake failed is shaken hands
with once more for it, and a rank not yet tried is shaken hands with. Only the ranks already shaken hands with
used to get one: the others kept the request's blocks until their lease ended."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load
from pdlaunch.kv_transfer.decode.loads import DecodeLoads
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.handshake import DeviceInfo, HandshakeInfo, compat_fields, compat_hash
from pdlaunch.kv_transfer.notifications import ReadDone, parse_notification
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.reshard import plan_reshard
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import make_spec

SPEC = make_spec(groups=2)  # 2 KV heads per block: decode TP 1 reads both prefill ranks (1 head each)
LOGGER = "pdlaunch.kv_transfer.decode.reshard_load"


class _Agent:
    name = "decode-agent"
    device_id = 0
    release_cancels = True
    release_wait_seconds = 0.0

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

    def get(self, remote: RemoteKV) -> RemoteEngine:
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


def _failed_load(agent: _Agent, peers: _Peers, executor: ThreadPoolExecutor) -> str:
    """Run the resharding load through the loader and the engine thread's poll; the load's error."""
    ctx = LoadContext(agent=cast(Any, agent), spec=lambda: SPEC, peers=cast(Any, peers), keys=KEYS,
                      handshake_timeout=1.0, transfer_timeout=30.0, verify_kv=False, executor=executor,
                      reader="decode")
    loads = DecodeLoads(ctx)
    remote = RemoteKV(engine_id="P", request_id="p-1", host="10.0.0.9", port=7000, block_ids=[[5, 6], [5, 6]],
                      tp_size=2, kv_heads_per_rank=1, rank_ports=[7000, 7001])
    now = time.monotonic()
    load = Load("r-1", remote, [[(0, 1, 5), (1, 2, 6)], [(0, 1, 5), (1, 2, 6)]], deadline=now + 30.0, started=now)
    load.reshard = plan_reshard(remote, SPEC.tp_rank, SPEC.tp_size, SPEC.num_kv_heads)
    loads.table.add(load)
    loads.run(load)
    finished, failed = loads.table.poll(time.monotonic())
    assert not finished and set(failed) == {"r-1"}
    return failed["r-1"]


def _released(agent: _Agent) -> list[str]:
    assert all(n == ReadDone(kind="release", request_id="p-1", reader="decode", readers=1) for _, n in agent.sent)
    return [peer for peer, _ in agent.sent]


def test_every_planned_rank_is_released_when_the_first_ranks_handshake_fails() -> None:
    """Rank 0's handshake times out (rank 1 is never tried by the load); both ranks get their release."""
    agent, peers = _Agent(), _Peers({0: 1})
    with ThreadPoolExecutor(max_workers=1) as executor:
        error = _failed_load(agent, peers, executor)
    assert "KV handshake with prefill engine P (TP rank 0) timed out" in error
    assert _released(agent) == ["prefill-agent-0", "prefill-agent-1"]


def test_a_rank_whose_handshake_fails_again_is_logged_and_the_others_released(
        caplog: pytest.LogCaptureFixture) -> None:
    agent, peers = _Agent(), _Peers({1: 2})
    with caplog.at_level(logging.WARNING, logger=LOGGER), ThreadPoolExecutor(max_workers=1) as executor:
        _failed_load(agent, peers, executor)
    assert _released(agent) == ["prefill-agent-0"]
    assert peers.tried == [0, 1, 1]  # rank 1: the load's handshake, then one more for its release
    [line] = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "request r-1: release notification to prefill engine P at 10.0.0.9:7001 (TP rank 1) not sent" in line
    assert "the prefill keeps the request's blocks until its hold's lease" in line
