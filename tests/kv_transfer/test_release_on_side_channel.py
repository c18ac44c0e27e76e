"""A release sent on the side channel ("release": a decode rank that has not shaken hands with a prefill rank has no
NIXL agent of it to notify) counts as the release notification does, once: the side channel's client sends a request
again when its connection resets before the answer, and a release counted twice would count for another rank of the
same decode (`readers`), ending the hold while that rank still READs it. A decode sends none for a request id the
prefill never confirmed (vLLM push-proxy params: the client's word), since it could free another client's hold.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest

from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load
from pdlaunch.kv_transfer.messages import ClaimReadRequest, Empty, ReleaseRequest
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import make_spec

WAIT_S = 60.0  # the lease, and the decode's timeouts: far longer than any test here


def _release(nonce: str, readers: int = 2) -> ReleaseRequest:
    return ReleaseRequest(type="release", load="load-0", request_id="p-1", reader="decode", readers=readers,
                          nonce=nonce)


def test_a_release_sent_again_counts_once() -> None:
    """Decode TP 2 reads prefill TP 1: both decode ranks claimed the hold, each says when it is through with it
    (readers=2). Rank 0's release arrives twice; the hold lives until rank 1's word."""
    holds = HoldTable(lease_seconds=WAIT_S)
    holds.hold("p-1", [[3, 4]])
    holds.claim_read(ClaimReadRequest(type="claim_read", load="load-0", request_id="p-1", seconds=WAIT_S,
                                      reader="decode"))
    assert holds.on_release(_release("rank-0")) == Empty()
    holds.on_release(_release("rank-0"))
    hold = holds.get("p-1")
    assert hold is not None and hold.notified == {("decode", "load-0"): 1} and not hold.done
    assert holds.poll(time.monotonic()) == set()
    holds.on_release(_release("rank-1"))
    assert holds.poll(time.monotonic()) == {"p-1"}


@pytest.fixture
def prefill() -> Iterator[tuple[HoldTable, SideChannelServer, list[ReleaseRequest]]]:
    holds = HoldTable(lease_seconds=WAIT_S)
    holds.hold("p-1", [[3]])
    releases: list[ReleaseRequest] = []

    def release(message: ReleaseRequest) -> Empty:
        releases.append(message)
        return holds.on_release(message)

    server = SideChannelServer("127.0.0.1", 0, {"release": release}, KEYS)
    try:
        yield holds, server, releases
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("confirmed", [True, False], ids=["signed params", "unconfirmed push-proxy id"])
def test_a_decode_releases_only_a_request_the_prefill_named(
        prefill: tuple[HoldTable, SideChannelServer, list[ReleaseRequest]], confirmed: bool) -> None:
    holds, server, releases = prefill
    with ThreadPoolExecutor(max_workers=1) as executor:
        ctx = LoadContext(agent=cast(Any, None), spec=lambda: make_spec(), peers=cast(Any, None), keys=KEYS,
                          handshake_timeout=WAIT_S, transfer_timeout=WAIT_S, verify_kv=False, executor=executor,
                          reader="decode")
        remote = RemoteKV(engine_id="P", request_id="p-1", host="127.0.0.1", port=server.port,
                          block_ids=[[3]] if confirmed else None)
        now = time.monotonic()
        try:
            ctx.send_release(Load("r-1", remote, [[(0, 10, 3)]], deadline=now + WAIT_S, started=now), remote)
        finally:
            ctx.connections.close()
    if confirmed:
        [message] = releases
        assert (message.request_id, message.reader, message.readers) == ("p-1", "decode", 1)
        assert holds.poll(time.monotonic()) == {"p-1"}
    else:
        assert releases == [] and holds.get("p-1") is not None
