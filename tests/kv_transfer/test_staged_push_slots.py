"""Staged push into decode's own staging slots: a chunk whose loader gave up (deadline, side-channel
error) keeps its slots until the chunk's push_done/push_failed or the drain's end, since a WRITE the
prefill posted just before the deadline may still land in them (and another load's chunk would then
be copied from them)."""

from __future__ import annotations

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
from pdlaunch.kv_transfer.messages import Empty, PushRequest
from pdlaunch.kv_transfer.notifications import PushDone, PushFailed
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.staging import StagingArea

NUM_BLOCKS = 8
DEADLINE = 0.3  # the load's transfer time; the test's push request is never answered by a notification


class _Agent:
    name = "decode-agent"
    device_id = 0

    def metadata(self) -> bytes:
        return b"metadata"


@pytest.fixture
def ctx() -> Iterator[LoadContext]:
    caches = [torch.zeros(NUM_BLOCKS, 1, 2, 4, 1, 2)]
    spec = KVCacheSpec(kv_caches=caches, num_blocks=NUM_BLOCKS, block_size=4, num_kv_heads=1, head_dim=2,
                       dtype=torch.float32, group_layers=[[0]], group_sliding_window=[None], model_name="m")
    executor = ThreadPoolExecutor(max_workers=1)
    context = LoadContext(agent=cast(Any, _Agent()), spec=lambda: spec, peers=cast(Any, None), keys=cast(Any, None),
                          handshake_timeout=1.0, transfer_timeout=DEADLINE, verify_kv=False, executor=executor,
                          reader="decode")
    context.staging = StagingArea(caches, budget_bytes=1 << 20)
    yield context
    executor.shutdown(wait=True)


def _load() -> Load:
    now = time.monotonic()
    remote = RemoteKV(engine_id="prefill", request_id="p-1", host="127.0.0.1", port=1, block_ids=[[5, 6]])
    return Load("r-1", remote, [[(0, 1, 5), (1, 2, 6)]], deadline=now + DEADLINE, started=now,
                state=LoadState.RUNNING)


def _run(ctx: LoadContext, load: Load, monkeypatch: pytest.MonkeyPatch, notif: str = "") -> list[PushRequest]:
    """Run the staged push; the prefill accepts each chunk (and with `notif` reports it at once)."""
    sent: list[PushRequest] = []

    def ask(remote: RemoteKV, message: Any, reply: type[Any], timeout: float, what: str) -> Any:
        sent.append(message)
        if notif == "push_failed":
            ctx.chunks.on_notif(PushFailed(kind="push_failed", nonce=message.nonce, error="WRITE failed"))
        return Empty()

    monkeypatch.setattr(ctx, "ask", ask)
    remote = SimpleNamespace(mode="push", info=SimpleNamespace(staging_slots=0), agent_name="prefill-agent")
    with pytest.raises(KVTransferError):
        StagedLoad(ctx, cast(Any, remote)).run(load)
    return sent


@pytest.mark.parametrize("end", ["push_done", "push_failed", "drain"])
def test_timed_out_chunk_keeps_its_slots_until_no_write_can_land(ctx: LoadContext, monkeypatch: pytest.MonkeyPatch,
                                                                 end: str) -> None:
    staging = ctx.staging
    assert staging is not None
    load = _load()
    sent = _run(ctx, load, monkeypatch)  # the loader gives up at the deadline, no notification came
    assert len(sent) == 1 and sent[0].base_addrs == [staging.buffers[0].data_ptr()]
    assert staging.num_free() == staging.num_slots - 2, "the slots were freed while the WRITE may still land"
    if end == "drain":
        ctx.chunks.forget(load.nonce)  # the load's drain ended (table.poll_draining)
    else:
        notif = PushDone(kind="push_done", nonce=sent[0].nonce) if end == "push_done" else \
            PushFailed(kind="push_failed", nonce=sent[0].nonce, error="cancelled")
        assert ctx.chunks.on_notif(notif)
    assert staging.num_free() == staging.num_slots
    assert not ctx.chunks.on_notif(PushDone(kind="push_done", nonce=sent[0].nonce))  # freed once only
    assert staging.num_free() == staging.num_slots


def test_chunk_that_ended_before_its_loader_gave_up_frees_its_slots_at_once(ctx: LoadContext,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    staging = ctx.staging
    assert staging is not None
    _run(ctx, _load(), monkeypatch, notif="push_failed")  # push_failed: nothing more lands
    assert staging.num_free() == staging.num_slots


def test_push_not_sent_frees_its_slots_at_once(ctx: LoadContext, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = ctx.staging
    assert staging is not None
    load = _load()
    load.fail("the engine thread failed it")  # before the chunk's push request went out
    with pytest.raises(KVTransferError):
        StagedLoad(ctx, cast(Any, SimpleNamespace(mode="push", info=SimpleNamespace(staging_slots=0),
                                                  agent_name="prefill-agent"))).run(load)
    assert staging.num_free() == staging.num_slots
