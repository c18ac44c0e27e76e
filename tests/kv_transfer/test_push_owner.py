"""Push requests and cancels name their owner, the nonce of the decode's load: a staged push's chunks carry
their own nonces, so the prefill could not tell one decode's push chunk from another's push of the same request
id (a proxy retried the decode leg on a second decode). A cancel then answered in_flight for the other
decode's WRITE, and the cancelling decode drained, waiting for a push_done/push_failed that was never its own.
Now a cancel answers in_flight for its owner's pushes only; the other's push keeps the blocks held
(test_cancel_push_one_owner.py), and its notification goes to its own decode. A push or cancel without an owner
(an older decode) is refused, naming the fix."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState
from pdlaunch.kv_transfer.decode.staged import StagedLoad
from pdlaunch.kv_transfer.messages import CancelPushAnswer, CancelPushRequest, Empty, Envelope, PushRequest
from pdlaunch.kv_transfer.notifications import PushDone, parse_notification
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.push_sender import PushSender
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.side_channel.client import call
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
from pdlaunch.kv_transfer.staging import StagingArea
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import make_spec

LOAD_A = "aaaaaaaaaaaaaaaa"  # the load nonce of decode A, which gave up the request
LOAD_B = "bbbbbbbbbbbbbbbb"  # of decode B, where the proxy retried it
CHUNK_B = "0000000000000b01"  # B's staged chunk: its own nonce, not its load's


def _cancel(holds: HoldTable, owner: str) -> CancelPushAnswer:
    return holds.cancel_push(CancelPushRequest(type="cancel_push", request_id="p-1", owner=owner))


class _Agent:
    """B's WRITE lands at once; decode A's cancel_push reaches the prefill while it is in flight."""

    def __init__(self, holds: HoldTable) -> None:
        self.holds = holds
        self.answers: list[CancelPushAnswer] = []
        self.freed_mid_write: set[str] = set()
        self.sent: list[tuple[str, bytes]] = []  # (peer, notification)

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> Any:
        self.answers.append(_cancel(self.holds, LOAD_A))
        self.freed_mid_write |= self.holds.poll(time.monotonic())
        self.sent.append((remote_agent, notif))  # NIXL hands push_done over with the WRITE
        return SimpleNamespace(state=lambda: "DONE", release=lambda: None, num_bytes=sum(n for _, n in local),
                               error=None)

    def notify(self, peer: str, message: bytes) -> None:
        self.sent.append((peer, message))


def test_a_cancel_during_another_decodes_push_chunk_is_not_in_flight_and_leaves_the_hold_to_it() -> None:
    spec, holds = make_spec(), HoldTable(lease_seconds=60.0)
    holds.hold("p-1", [[3, 4, 5, 6]])
    agent = _Agent(holds)
    message = PushRequest(type="push", reader="d", request_id="p-1", nonce=CHUNK_B, owner=LOAD_B, last=False,
                          agent_name="decode-b", agent_metadata="00", runs=[[(0, 3, 2)]], base_addrs=[4096],
                          block_bytes=spec.block_bytes, deadline_in=30.0)
    hold = holds.claim_push(message, spec, wait=0.0)
    assert hold is not None
    sender = PushSender(cast(Any, agent), holds, cast(Any, None), transfer_timeout=30.0)
    sender.spec = spec
    sender._push(hold, message, "decode-b-agent", time.monotonic())
    assert agent.answers == [CancelPushAnswer(in_flight=False)], "B's WRITE is not A's: A waits for nothing"
    assert agent.freed_mid_write == set(), "the blocks were freed under B's WRITE"
    assert [(peer, parse_notification(n)) for peer, n in agent.sent] == [
        ("decode-b-agent", PushDone(kind="push_done", nonce=CHUNK_B))]
    assert holds.poll(time.monotonic()) == set(), "A's cancel freed the hold before B's next chunk"


def test_a_cancel_answers_in_flight_for_its_own_chunk_only() -> None:
    spec, holds = make_spec(), HoldTable(lease_seconds=60.0)
    holds.hold("p-1", [[3, 4]])
    message = PushRequest(type="push", reader="d", request_id="p-1", nonce=CHUNK_B, owner=LOAD_B, last=False,
                          agent_name="b", agent_metadata="00", runs=[[(0, 3, 2)]], base_addrs=[4096],
                          block_bytes=spec.block_bytes, deadline_in=30.0)
    hold = holds.claim_push(message, spec, wait=0.0)
    assert hold is not None
    assert _cancel(holds, LOAD_A) == CancelPushAnswer(in_flight=False)
    assert _cancel(holds, LOAD_B) == CancelPushAnswer(in_flight=True)
    assert holds.poll(time.monotonic()) == set()
    holds.unclaim_push(hold, message)  # B's WRITE ended: its push_done/push_failed told B
    assert _cancel(holds, LOAD_B) == CancelPushAnswer(in_flight=False)
    assert holds.poll(time.monotonic()) == {"p-1"}


# -- the decode names its load in its chunks and its cancel ----------------------------------------
@pytest.fixture
def ctx() -> Iterator[LoadContext]:
    caches = [torch.zeros(8, 1, 2, 4, 1, 2)]
    spec = KVCacheSpec(kv_caches=caches, num_blocks=8, block_size=4, num_kv_heads=1, head_dim=2, dtype=torch.float32,
                       group_layers=[[0]], group_sliding_window=[None], model_name="m")
    agent = SimpleNamespace(name="decode-agent", device_id=0, metadata=lambda: b"metadata")
    executor = ThreadPoolExecutor(max_workers=1)
    context = LoadContext(agent=cast(Any, agent), spec=lambda: spec, peers=cast(Any, None), keys=cast(Any, None),
                          handshake_timeout=1.0, transfer_timeout=0.3, verify_kv=False, executor=executor,
                          reader="decode")
    context.staging = StagingArea(caches, budget_bytes=1 << 20)
    yield context
    executor.shutdown(wait=True)


def test_a_staged_push_and_its_cancel_name_the_load_as_owner(ctx: LoadContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill's hold table gets what the decode sends: its chunk (whose WRITE never ends here: the loader
    times out) is in flight for its own load's cancel, whatever the chunk's nonce."""
    spec, holds = ctx.spec(), HoldTable(lease_seconds=60.0)
    holds.hold("p-1", [[5, 6]])
    sent: list[Any] = []

    def ask(remote: RemoteKV, message: Any, reply: type[Any], timeout: float, what: str) -> Any:
        sent.append(message)
        if isinstance(message, CancelPushRequest):
            return holds.cancel_push(message)
        assert holds.claim_push(message, spec, wait=0.0) is not None
        return Empty()

    monkeypatch.setattr(ctx, "ask", ask)
    now = time.monotonic()
    load = Load("r-1", RemoteKV(engine_id="prefill", request_id="p-1", host="127.0.0.1", port=1, block_ids=[[5, 6]]),
                [[(0, 1, 5), (1, 2, 6)]], deadline=now + 0.3, started=now, state=LoadState.RUNNING)
    remote = SimpleNamespace(mode="push", info=SimpleNamespace(staging_slots=0), agent_name="prefill-agent")
    with pytest.raises(KVTransferError, match="did not arrive within"):
        StagedLoad(ctx, cast(Any, remote)).run(load)
    ctx.cancel_push(load)
    push, cancel = sent
    assert push.owner == cancel.owner == load.nonce != push.nonce
    assert not load.write_ended, "the cancel of the chunk's own load was answered: nothing in flight"


# -- an older decode ------------------------------------------------------------------------------
@pytest.mark.parametrize("message", [
    {"type": "push", "request_id": "p-1", "nonce": CHUNK_B, "reader": "d", "agent_name": "b", "agent_metadata": "00",
     "runs": [[[0, 3, 2]]], "base_addrs": [4096], "block_bytes": [64], "deadline_in": 5.0},
    {"type": "cancel_push", "request_id": "p-1", "nonce": LOAD_A},
], ids=["push", "cancel_push"])
def test_a_message_without_owner_is_refused_naming_the_fix(message: dict[str, Any]) -> None:
    server = SideChannelServer("127.0.0.1", 0, {}, KEYS)
    refused = (rf"invalid side-channel message: msg\.{message['type']}\.owner: .*owner \(the nonce of the decode's "
               r"load\) is missing: the decode runs an older pdlaunch; run the same pdlaunch version on prefill and "
               r"decode")
    try:
        with pytest.raises(KVTransferError, match=refused):
            call("127.0.0.1", server.port, message, 5, "old decode", KEYS)
    finally:
        server.close()


def test_a_push_with_owner_validates_from_json() -> None:
    """What a decode sends travels as JSON: its runs are arrays, which strict validation accepts as tuples."""
    push = PushRequest(type="push", reader="d", request_id="p-1", nonce=CHUNK_B, owner=LOAD_B, agent_name="b",
                       agent_metadata="00", runs=[[(0, 3, 2)]], base_addrs=[4096], block_bytes=[64], deadline_in=5.0)
    body = json.dumps({"ts": time.time(), "nonce": "0" * 32, "msg": push.model_dump(mode="json")})
    assert Envelope.model_validate_json(body).msg == push
