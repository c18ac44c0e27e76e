"""The prefill's block digests (kv_checksum) are checked against the blocks the load moves before anything
indexes them: digests for fewer KV-cache groups or fewer blocks than the load names fail that load, before
any READ, with an error naming the prefill; they never raise out of the engine thread's poll, where an
IndexError would fail every request of the step (and of every step after it: the load stays in the table)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.kv_transfer.checksum import block_checksums
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState
from pdlaunch.kv_transfer.decode.loads import DecodeLoads
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.reshard import plan_reshard
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import handshake_for, make_spec
from tests.kv_transfer.test_reshard_release_failed_handshake import _Agent as ReshardAgent
from tests.kv_transfer.test_reshard_release_failed_handshake import _Peers as ReshardPeers

SPEC = make_spec(groups=2)
PAIRS = [[(0, 1, 5), (1, 2, 6)], [(0, 1, 5), (1, 2, 6)]]  # block-table index, local id, prefill id


class _ReadAgent:
    """A READ that is done at once (the bytes "landed"; the local blocks keep what they hold)."""

    name = "decode-agent"
    release_cancels = True
    release_wait_seconds = 0.0
    release_wait_seconds_per_byte = 0.0

    def __init__(self) -> None:
        self.reads = 0

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> Any:
        self.reads += 1
        return SimpleNamespace(state=lambda: "DONE", release=lambda: None, num_bytes=sum(n for _, n in local),
                               error=None)

    def notify(self, agent_name: str, message: bytes) -> None:
        pass


def _digests(g: int) -> list[str]:
    return block_checksums(SPEC.kv_caches[g], [1, 2])  # what lands in local blocks 1, 2 (the fake READ)


def _pull(checksums: list[list[str]], executor: ThreadPoolExecutor) -> tuple[DecodeLoads, Load, _ReadAgent]:
    """A pull of PAIRS whose params carried `checksums`, run on this thread up to its posted READ."""
    agent = _ReadAgent()
    ctx = LoadContext(agent=cast(Any, agent), spec=lambda: SPEC, peers=cast(Any, None), keys=KEYS,
                      handshake_timeout=1.0, transfer_timeout=30.0, verify_kv=True, executor=executor,
                      reader="decode")
    remote = RemoteEngine(handshake_for(SPEC), "prefill-agent", "pull", "test", ("10.0.0.9", 7000))
    ctx.peers = cast(Any, SimpleNamespace(get=lambda r, stopped=None: remote))
    ctx.send_claim_read = lambda load, source: SimpleNamespace(answer=lambda reply: reply())  # type: ignore[method-assign]
    loads = DecodeLoads(ctx)
    now = time.monotonic()
    source = RemoteKV(engine_id="P", request_id="p-1", host="10.0.0.9", port=7000, block_ids=[[5, 6], [5, 6]],
                      checksums=checksums)
    load = Load("r-1", source, PAIRS, deadline=now + 30.0, started=now)
    loads.table.add(load)
    loads.run(load)
    return loads, load, agent


def test_fitting_digests_are_verified_and_the_load_completes() -> None:
    with ThreadPoolExecutor(max_workers=1) as executor:
        loads, load, agent = _pull([_digests(0), _digests(1)], executor)
        finished, failed = loads.table.poll(time.monotonic())
    assert agent.reads == 1 and finished == {"r-1"} and failed == {}


@pytest.mark.parametrize("checksums, sent", [
    ([_digests(0)], "digests of 1 KV-cache groups"),
    ([_digests(0), _digests(1)[:1]], "1 block digests for group 1"),
    ([[], []], "0 block digests for group 0"),
])
def test_digests_for_fewer_blocks_than_the_load_fail_it_before_any_read(checksums: list[list[str]],
                                                                        sent: str) -> None:
    with ThreadPoolExecutor(max_workers=1) as executor:
        loads, load, agent = _pull(checksums, executor)
        finished, failed = loads.table.poll(time.monotonic())  # raised IndexError on the engine thread
    assert agent.reads == 0, "no READ of blocks whose digests are missing"
    assert load.state == LoadState.FAILED and finished == set()
    assert "r-1" in failed and "request r-1: prefill engine P at 10.0.0.9:7000 sent" in failed["r-1"]
    assert sent in failed["r-1"]
    assert loads.table.running() == [], "the failed load leaves the table"


def test_a_resharding_ranks_digests_for_fewer_blocks_fail_the_load_before_any_read() -> None:
    """Prefill TP 2 -> decode TP 1: rank 1's digests cover one block of the two the load moves."""
    agent, peers = ReshardAgent(), ReshardPeers({})
    asked: list[Any] = []
    with ThreadPoolExecutor(max_workers=1) as executor:
        ctx = LoadContext(agent=cast(Any, agent), spec=lambda: SPEC, peers=cast(Any, peers), keys=KEYS,
                          handshake_timeout=1.0, transfer_timeout=30.0, verify_kv=True, executor=executor,
                          reader="decode")
        ctx.ask = lambda *args: asked.append(args)  # type: ignore[assignment,method-assign,return-value]
        loads = DecodeLoads(ctx)
        full = [["d"] * 2, ["d"] * 2]
        remote = RemoteKV(engine_id="P", request_id="p-1", host="10.0.0.9", port=7000, block_ids=[[5, 6], [5, 6]],
                          tp_size=2, kv_heads_per_rank=1, rank_ports=[7000, 7001],
                          rank_checksums=[full, [["d"] * 2, ["d"]]])
        now = time.monotonic()
        load = Load("r-1", remote, PAIRS, deadline=now + 30.0, started=now)
        load.reshard = plan_reshard(remote, SPEC.tp_rank, SPEC.tp_size, SPEC.num_kv_heads)
        loads.table.add(load)
        loads.run(load)
        finished, failed = loads.table.poll(time.monotonic())
    assert asked == [], "no staging request (nor READ) of blocks whose digests are missing"
    assert finished == set() and "prefill engine P at 10.0.0.9:7001 (TP rank 1) sent 1 block digests for group 1" \
        in failed["r-1"]
    assert sorted(peer for peer, _ in agent.sent) == ["prefill-agent-0", "prefill-agent-1"], "both ranks released"
