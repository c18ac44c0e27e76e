"""A prefill rank counts a decode load's read_done/release notifications against the plan of that decode's layout
(stated in its handshake: prefill/reader_plans.py), not against the `readers` each notification names: that count is
the word of a process outside the prefill. Before, the load's first word fixed it: a decode naming readers=1024 where
two of its ranks read kept the blocks held to the lease or the READ claim's cap, and one naming 1 let the first rank's
word free blocks the second rank still READ.

Decode TP 2 (one KV head per rank) reads prefill TP 1 (two heads): both decode ranks read prefill rank 0, which
waits for two words per load.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.kv_transfer.decode.peers import PeerCache
from pdlaunch.kv_transfer.handshake import DeviceInfo
from pdlaunch.kv_transfer.messages import ClaimReadRequest, DecodeLayout, ReleaseRequest
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.params import PrefillAnswer
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.side import PrefillSide
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.reshard import expected_readers, plan_reshard, plausible_readers
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import handshake_for, make_spec

LEASE_S = 60.0  # far longer than any test here: a hold freed within one was freed by its notifications
DECODE, LOAD = "decode-engine", "load-0"
LOGGER = "pdlaunch.kv_transfer.prefill.holds"
PREFILL_SPEC = make_spec(num_kv_heads=2)  # TP 1, rank 0
DECODE_LAYOUT = DecodeLayout(reader=DECODE, tp_size=2, kv_heads_per_rank=1)


def _held(layout: DecodeLayout | None = DECODE_LAYOUT) -> HoldTable:
    """Prefill rank 0 of TP 1 holding p-1, the decode's READ claimed it; `layout`: what the decode's handshake said."""
    holds = HoldTable(lease_seconds=LEASE_S)
    holds.plans.set_local(PREFILL_SPEC)
    holds.plans.learn(layout)
    holds.hold("p-1", [[3, 4]])
    holds.claim_read(ClaimReadRequest(type="claim_read", request_id="p-1", seconds=30.0, reader=DECODE, load=LOAD))
    return holds


def _notify(holds: HoldTable, readers: int, kind: str = "read_done") -> None:
    holds.on_read_done(ReadDone(kind=kind, request_id="p-1", reader=DECODE, load=LOAD,  # type: ignore[arg-type]
                                readers=readers))


def _freed(holds: HoldTable) -> bool:
    return holds.poll(time.monotonic()) == {"p-1"}


def test_an_inflated_first_count_does_not_keep_the_hold(caplog: pytest.LogCaptureFixture) -> None:
    holds = _held()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _notify(holds, readers=1024)
    assert not _freed(holds), "one of the two reading ranks has spoken"
    _notify(holds, readers=2)
    assert _freed(holds), "both ranks of the plan have spoken: the hold waited for an inflated count"
    assert (f"KV read_done notification from load {LOAD} of {DECODE} for request p-1 names readers=1024, but its "
            "handshake's layout (TP 2, 1 KV heads per rank) has 2 of its ranks notify this one (TP rank 0 of 1): "
            "counted as one of 2") in caplog.text


def test_a_first_count_below_the_plan_does_not_free_blocks_another_rank_reads(
        caplog: pytest.LogCaptureFixture) -> None:
    holds = _held()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _notify(holds, readers=1)
    assert not _freed(holds), "freed while the decode's other rank still READs"
    assert "names readers=1, but its handshake's layout" in caplog.text
    _notify(holds, readers=2)
    assert _freed(holds)


def test_a_later_count_that_differs_from_the_first_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The honest first word fixes nothing the plan did not: the second, inflated one ends the load all the same,
    and is logged."""
    holds = _held()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _notify(holds, readers=2, kind="release")
        assert caplog.text == ""
        _notify(holds, readers=1024)
    assert _freed(holds)
    assert "names readers=1024, but its handshake's layout" in caplog.text


def test_without_a_handshake_an_impossible_count_is_not_counted(caplog: pytest.LogCaptureFixture) -> None:
    """A decode whose every handshake with this rank failed sends its ranks' releases on the side channel: no plan
    here, so its first word's count stands, if some decode layout gives this rank that many notifications."""
    holds = _held(layout=None)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        holds.on_release(ReleaseRequest(type="release", request_id="p-1", reader=DECODE, load=LOAD, readers=1024,
                                        nonce="n-0"))
    hold = holds.get("p-1")
    assert hold is not None and hold.notified == {} and hold.release_nonces == {}
    assert ("names readers=1024, but no decode layout has that many ranks notify TP rank 0 of 1 (2 KV heads per "
            "rank), and its decode has not shaken hands with this rank: not counted") in caplog.text
    _notify(holds, readers=2, kind="release")
    assert not _freed(holds)
    _notify(holds, readers=1024, kind="release")  # counted toward the first counted word's 2
    assert _freed(holds)


def test_a_plan_learnt_after_the_first_word_settles_the_count() -> None:
    """Rank 0's handshake failed (its release came on the side channel, naming a count some layout allows); rank 1
    then shook hands: the load waits for the plan's two words, not the first word's 64."""
    holds = _held(layout=None)
    _notify(holds, readers=64, kind="release")
    holds.plans.learn(DECODE_LAYOUT)
    _notify(holds, readers=64)
    assert _freed(holds)


def test_a_table_without_its_ranks_layout_takes_the_first_count() -> None:
    """Before the prefill registered its KV cache there is no plan to count against (and no handshake is answered)."""
    holds = HoldTable(lease_seconds=LEASE_S)
    holds.plans.learn(DECODE_LAYOUT)
    holds.hold("p-1", [[3]])
    _notify(holds, readers=3)
    hold = holds.get("p-1")
    assert hold is not None and hold.readers == {(DECODE, LOAD): 3}


def test_a_forgotten_engines_layout_goes() -> None:
    holds = _held()
    holds.forget_engine(DECODE)
    assert holds.plans.plan(DECODE) is None


def _splits() -> Iterator[tuple[int, int, int]]:
    """(KV heads of the model, prefill TP, decode TP) that reshard.py maps."""
    for total, tp_p, tp_d in itertools.product((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)):
        if all(tp % total == 0 or total % tp == 0 for tp in (tp_p, tp_d)) and tp_p != tp_d:
            yield total, tp_p, tp_d


@pytest.mark.parametrize("total,tp_p,tp_d", list(_splits()))
def test_the_prefills_count_is_the_one_each_decode_rank_sends(total: int, tp_p: int, tp_d: int) -> None:
    heads_p, heads_d = max(1, total // tp_p), max(1, total // tp_d)
    params = PrefillAnswer(do_remote_prefill=True, remote_request_id="r", tp_size=tp_p, kv_heads_per_rank=heads_p,
                           remote_ports=list(range(9000, 9000 + tp_p)), remote_port=9000, remote_engine_id="P",
                           remote_host="h")
    for r in range(tp_d):
        for src in plan_reshard(RemoteKV.from_params(params), r, tp_d, heads_d).sources:
            assert expected_readers(src.rank, tp_p, heads_p, tp_d, heads_d) == src.readers
            assert src.readers in plausible_readers(src.rank, tp_p, heads_p)
    assert all(expected_readers(p, tp_p, heads_p, tp_p, heads_p) == 1 for p in range(tp_p)), "no resharding"


class _Agent:
    name = "decode-agent"

    def forget_remote(self, name: str) -> None:
        pass

    def add_remote(self, metadata: bytes) -> str:
        return "prefill-agent"


def test_the_decodes_handshake_tells_the_prefill_its_layout() -> None:
    """Over the authenticated side channel: a decode rank of TP 2 shakes hands with prefill rank 0 (its handshake
    handler is PrefillSide's), which then plans two words per load of that decode."""
    holds = HoldTable(lease_seconds=LEASE_S)
    holds.plans.set_local(PREFILL_SPEC)
    prefill = SimpleNamespace(_handshake=handshake_for(PREFILL_SPEC), holds=holds)
    server = SideChannelServer("127.0.0.1", 0, {"handshake": lambda m: PrefillSide._on_handshake(
        cast(PrefillSide, prefill), m)}, KEYS)
    try:
        decode_spec = make_spec(num_kv_heads=1, tp_size=2, tp_rank=1)
        peers = PeerCache(cast(Any, _Agent()), lambda: decode_spec, lambda: DeviceInfo(type="cpu"), "push", LEASE_S,
                          KEYS, reader=DECODE)
        peers.get(RemoteKV(engine_id="P", request_id="p-1", host="127.0.0.1", port=server.port, tp_rank=0))
    finally:
        server.shutdown()
        server.server_close()
    plan = holds.plans.plan(DECODE)
    assert plan is not None and plan.readers == 2
