"""What a prefill peer answers is checked against what the decode asked and has before anything indexes it:
the handshake's per-group fields against this engine's KV-cache groups, a staging answer's slots against
the blocks asked for and the peer's slot count, the prefill's block ids against its block count; and a
decode's push request names one base address per group. A peer of another pdlaunch version (or a bug)
fails the request with an error naming the peer, what it sent and what was expected, instead of a READ
of fewer blocks, of memory outside the peer's cache, or an IndexError deep in a thread."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydantic import ValidationError

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState
from pdlaunch.kv_transfer.decode.loads import DecodeLoads
from pdlaunch.kv_transfer.decode.peers import PeerCache, RemoteEngine
from pdlaunch.kv_transfer.handshake import DeviceInfo, HandshakeInfo
from pdlaunch.kv_transfer.messages import Empty, HandshakeAnswer, PushRequest, StageAnswer, UnstageRequest
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.side_channel import client
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import handshake_for, make_spec

SPEC = make_spec(groups=2)


def _info(**overrides: Any) -> HandshakeInfo:
    """A handshake that fits SPEC, with `overrides`."""
    return handshake_for(SPEC, **overrides)


class _Agent:
    name = "decode-agent"

    def __init__(self) -> None:
        self.added: list[bytes] = []

    def forget_remote(self, name: str) -> None:
        pass

    def add_remote(self, metadata: bytes) -> str:
        self.added.append(metadata)
        return "prefill-agent"


def _handshake(monkeypatch: pytest.MonkeyPatch, info: HandshakeInfo, rank: int | None = None) -> _Agent:
    """PeerCache._handshake against a side channel that answers `info` (push mode: no listen request)."""
    monkeypatch.setattr(client, "request", lambda *args, **kwargs: HandshakeAnswer(info=info))
    agent = _Agent()
    cache = PeerCache(cast(Any, agent), spec=lambda: SPEC, local_device=lambda: DeviceInfo(type="cpu"),
                      transfer_mode="push", handshake_timeout=1.0, keys=KEYS, reader="decode-engine")
    cache._handshake("P", "10.0.0.9", 7000, rank)
    return agent


def test_a_fitting_handshake_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _handshake(monkeypatch, _info()).added == [b"\x00"]


@pytest.mark.parametrize("overrides, sent, expected", [
    ({"base_addrs": [1 << 20]}, "base_addrs names 1 KV-cache groups", "this engine has 2"),
    ({"block_bytes": [SPEC.block_bytes[0]]}, f"block_bytes is [{SPEC.block_bytes[0]}]", f"expected {SPEC.block_bytes}"),
    ({"num_blocks": 0}, "num_blocks is 0", "expected at least 1"),
    ({"staging_slots": -3}, "staging_slots is -3", "expected 0 (no staging) or more"),
])
def test_a_handshake_that_does_not_fit_fails_naming_the_peer(monkeypatch: pytest.MonkeyPatch,
                                                             overrides: dict[str, Any], sent: str,
                                                             expected: str) -> None:
    with pytest.raises(KVTransferError) as err:
        _handshake(monkeypatch, _info(**overrides))
    text = str(err.value)
    assert "handshake of prefill engine P at 10.0.0.9:7000 does not fit" in text
    assert sent in text and expected in text and err.value.hint


def test_a_resharding_handshake_gives_blocks_of_the_peers_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill rank of TP 2 holds 1 of this engine's 2 KV heads: its blocks are half the size."""
    half = [b // 2 for b in SPEC.block_bytes]
    reshard = dict(tp_size=2, tp_rank=1, num_kv_heads=1, compat_hash="another TP split")
    _handshake(monkeypatch, _info(block_bytes=half, **reshard), rank=1)
    with pytest.raises(KVTransferError, match=r"\(TP rank 1\) does not fit this engine: block_bytes is"):
        _handshake(monkeypatch, _info(**reshard), rank=1)


# -- a READ through the prefill's staging slots ----------------------------------------------------
class _ReadAgent:
    name = "decode-agent"
    release_cancels = True

    def __init__(self) -> None:
        self.reads: list[list[tuple[int, int]]] = []

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> Any:
        self.reads.append(remote)
        return SimpleNamespace(state=lambda: "DONE", release=lambda: None, num_bytes=sum(n for _, n in local),
                               error=None)


def _ctx(agent: Any) -> LoadContext:
    return LoadContext(agent=agent, spec=lambda: SPEC, peers=cast(Any, None), keys=KEYS, handshake_timeout=1.0,
                       transfer_timeout=30.0, verify_kv=False, executor=cast(Any, None), reader="decode")


def _load(pairs: list[list[tuple[int, int, int]]]) -> Load:
    now = time.monotonic()
    remote = RemoteKV(engine_id="P", request_id="p-1", host="10.0.0.9", port=7000, block_ids=[[5, 6], [5, 6]])
    return Load("r-1", remote, pairs, deadline=now + 30.0, started=now, state=LoadState.RUNNING)


def _staged_read(monkeypatch: pytest.MonkeyPatch, slots: list[list[int]], agent: _ReadAgent, asked: list[Any]) -> None:
    """READ blocks [5, 6] of both groups through a prefill with 4 staging slots that answers `slots`."""
    ctx = _ctx(agent)

    def ask(remote: RemoteKV, message: Any, reply: type[Any], timeout: float, what: str) -> Any:
        asked.append(message)
        return StageAnswer(ticket="t-1", slots=slots) if reply is StageAnswer else Empty()

    monkeypatch.setattr(ctx, "ask", ask)
    load = _load([[(0, 1, 5), (1, 2, 6)], [(0, 1, 5), (1, 2, 6)]])
    remote = RemoteEngine(_info(staging_slots=4), "prefill-agent", "pull", "test", ("10.0.0.9", 7000))
    ctx.read_chunk(load, remote, load.remote, [[1, 2], [1, 2]], [0, 0], [[5, 6], [5, 6]], SPEC.block_bytes)


def test_a_fitting_staging_answer_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    agent, asked = _ReadAgent(), list[Any]()
    _staged_read(monkeypatch, [[0, 1], [0, 1]], agent, asked)
    assert len(agent.reads) == 1 and len(agent.reads[0]) == 2  # one run of 2 slots per group
    assert isinstance(asked[-1], UnstageRequest) and asked[-1].ticket == "t-1"


@pytest.mark.parametrize("slots, error", [
    ([[0], [0, 1]], r"slots for \[1, 2\] blocks per KV-cache group, \[2, 2\] were asked for"),
    ([[0, 1]], r"slots for \[2\] blocks per KV-cache group, \[2, 2\] were asked for"),
    ([[0, 1], [2, 4]], "slot 4, outside the 4 staging slots of its handshake"),
    ([[0, 1], [-1, 2]], "slot -1, outside the 4 staging slots of its handshake"),
])
def test_a_staging_answer_that_does_not_fit_fails_before_the_read_and_is_unstaged(
        monkeypatch: pytest.MonkeyPatch, slots: list[list[int]], error: str) -> None:
    agent, asked = _ReadAgent(), list[Any]()
    with pytest.raises(KVTransferError, match=error) as err:
        _staged_read(monkeypatch, slots, agent, asked)
    assert "request r-1: prefill engine P at 10.0.0.9:7000 answered a staging request" in str(err.value)
    assert agent.reads == [], "no READ of fewer blocks than the load needs, nor outside the peer's slots"
    assert isinstance(asked[-1], UnstageRequest) and asked[-1].ticket == "t-1", "the prefill's slots are freed"


# -- the prefill's block ids ------------------------------------------------------------------
def test_block_ids_past_the_prefills_cache_fail_the_load_before_any_read() -> None:
    agent = _ReadAgent()
    executor = ThreadPoolExecutor(max_workers=1)
    ctx = _ctx(agent)
    ctx.executor = executor
    remote = RemoteEngine(_info(num_blocks=6), "prefill-agent", "pull", "test", ("10.0.0.9", 7000))
    ctx.peers = cast(Any, SimpleNamespace(get=lambda r, stopped=None: remote))
    loads = DecodeLoads(ctx)
    load = _load([[(0, 1, 5), (1, 2, 6)], [(0, 1, 5)]])
    load.state = LoadState.HANDSHAKE
    try:
        loads.run(load)
    finally:
        executor.shutdown(wait=True)
    assert load.state == LoadState.FAILED and agent.reads == []
    assert load.error is not None
    assert "request r-1: the prefill's block ids name block 6 of prefill engine P at 10.0.0.9:7000, whose " \
        "handshake announced 6 blocks" in load.error


# -- a decode's push request --------------------------------------------------------------------
def test_a_push_request_names_one_base_address_per_group() -> None:
    fields: dict[str, Any] = dict(type="push", request_id="p-1", nonce="n-1", owner="n-1", reader="d",
                                  agent_name="decode", agent_metadata="00", runs=[[(0, 3, 2)], [(0, 3, 2)]],
                                  block_bytes=[64, 64], deadline_in=5.0)
    PushRequest.model_validate({**fields, "base_addrs": [4096, 8192]})
    with pytest.raises(ValidationError, match="name 2, 1 and 2 KV-cache groups"):
        PushRequest.model_validate({**fields, "base_addrs": [4096]})
