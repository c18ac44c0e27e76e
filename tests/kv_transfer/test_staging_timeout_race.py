"""A stage request whose wait runs out just as its copy registers its ticket: the answer and the staging slots
agree. The decode used to be told the stage failed while the ticket kept its slots until the ticket's deadline
(the transfer timeout), slots no one would READ or unstage."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, cast

from pdlaunch.kv_transfer.messages import StageRequest, UnstageRequest
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.staging_server import StagingServer
from pdlaunch.kv_transfer.staging import StagingArea
from tests.kv_transfer.pd_procs import make_spec

WAIT_S = 0.2  # the staging server's transfer timeout: how long a stage request waits for its copy


class _CopyEndsAsTheWaitRunsOut:
    """Runs the copy at once (it registers its ticket), but hands back a future still running: the request's
    wait times out before the copy returns."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        assert future.set_running_or_notify_cancel()
        fn(*args)
        return future


def test_a_stage_whose_copy_registered_as_its_wait_ran_out_answers_staged() -> None:
    spec = make_spec(num_blocks=8)
    holds = HoldTable(lease_seconds=60.0)
    holds.hold("r1", [[3, 4]])
    stager = StagingServer(holds, cast(Any, _CopyEndsAsTheWaitRunsOut()), transfer_timeout=WAIT_S)
    stager.spec, stager.staging = spec, StagingArea(spec.kv_caches, 4 * sum(spec.block_bytes))
    answer = stager.stage(StageRequest(type="stage", load="load-0", request_id="r1", blocks=[[3, 4]], reader="decode",
                                           seconds=WAIT_S))
    assert stager.users() == {"r1"} and stager.staging.num_free() == stager.staging.num_slots - 2
    assert len(answer.slots[0]) == 2
    hold = holds.get("r1")
    assert hold is not None and hold.busy == 0
    stager.unstage(UnstageRequest(type="unstage", ticket=answer.ticket))  # the decode read them: slots back
    assert stager.users() == set() and stager.staging.num_free() == stager.staging.num_slots
