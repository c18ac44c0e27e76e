"""A decode's cancel_push answers in_flight only for a push WRITE, never for another decode's staging copy of
the same hold (a proxy retried the decode leg there; that one stages and READs): it used to answer in_flight
for any claim, so the cancelling decode drained, waiting for a push_done/push_failed that never comes. Either
way the blocks stay held until the copy reading them ends, and a staging decode's stage request claims them
for it until its read_done (its next chunk needs them)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from pdlaunch.kv_transfer.messages import CancelPushAnswer, CancelPushRequest, PushRequest, StageAnswer, StageRequest
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.staging_server import StagingServer
from pdlaunch.kv_transfer.staging import StagingArea
from tests.kv_transfer.pd_procs import make_spec

WAIT_S = 30.0  # generous: every wait here ends by its event, never by this
LOAD = "a1b2c3d4e5f60718"  # the nonce of the cancelling decode's load


def _cancel(holds: HoldTable) -> CancelPushAnswer:
    return holds.cancel_push(CancelPushRequest(type="cancel_push", request_id="r1", owner=LOAD))


def test_a_cancel_during_another_decodes_staging_copy_is_not_in_flight_and_frees_after_the_copy() -> None:
    spec = make_spec(num_blocks=8)
    holds = HoldTable(lease_seconds=60.0)
    holds.hold("r1", [[3, 4]])
    executor = ThreadPoolExecutor(max_workers=1)
    stager = StagingServer(holds, executor, transfer_timeout=WAIT_S)
    stager.spec, stager.staging = spec, StagingArea(spec.kv_caches, 4 * sum(spec.block_bytes))
    copying, finish = threading.Event(), threading.Event()
    gather = stager.staging.gather

    def blocking_gather(kv_caches: list[torch.Tensor], blocks: list[list[int]], slots: list[int]) -> None:
        copying.set()
        assert finish.wait(WAIT_S), "the test never let the staging copy finish"
        gather(kv_caches, blocks, slots)

    stager.staging.gather = blocking_gather  # type: ignore[method-assign]
    answers: list[StageAnswer] = []
    stage = threading.Thread(target=lambda: answers.append(
        stager.stage(StageRequest(type="stage", load="load-0", request_id="r1", blocks=[[3, 4]], reader="decode",
                                  seconds=WAIT_S))))
    try:
        stage.start()
        assert copying.wait(WAIT_S), "the staging copy did not start"
        assert _cancel(holds) == CancelPushAnswer(in_flight=False), "another decode's staging copy is no WRITE"
        assert holds.poll(time.monotonic()) == set(), "freed while the staging copy reads the blocks"
        finish.set()
        stage.join(WAIT_S)
        assert not stage.is_alive() and len(answers) == 1
        assert holds.poll(time.monotonic()) == set(), "freed under the staging decode's claim"
        holds.on_read_done(ReadDone(load="load-0", kind="read_done", request_id="r1", reader="decode"))
        assert holds.poll(time.monotonic()) == {"r1"}
    finally:
        finish.set()
        executor.shutdown(wait=True)


def test_a_cancel_during_a_push_is_in_flight_and_frees_only_after_the_staging_copy_too() -> None:
    spec = make_spec()
    holds = HoldTable(lease_seconds=60.0)
    holds.hold("r1", [[3, 4]])
    message = PushRequest(type="push", reader="d", request_id="r1", nonce="0000000000000001", owner=LOAD,
                          agent_name="decode", agent_metadata="00", runs=[[(0, 3, 2)]], base_addrs=[4096],
                          block_bytes=spec.block_bytes, deadline_in=WAIT_S)  # a chunk of the cancelling load
    push = holds.claim_push(message, spec, wait=0.0)
    assert push is not None
    copy = holds.claim("r1", [[3, 4]], spec.block_bytes, spec)  # a staging copy: not exclusive
    assert _cancel(holds) == CancelPushAnswer(in_flight=True)
    holds.unclaim_push(push, message)  # the WRITE ended: its push_done/push_failed tells the decode
    assert _cancel(holds) == CancelPushAnswer(in_flight=False)
    assert holds.poll(time.monotonic()) == set(), "freed while the staging copy reads the blocks"
    holds.unclaim(copy)
    assert holds.poll(time.monotonic()) == {"r1"}
