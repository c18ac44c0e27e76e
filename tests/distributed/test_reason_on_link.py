"""A rank whose step failed sends its reason (RankFailed), then leaves the group and tears down (its connector,
its memory, the interpreter) before its process ends. Rank 0's collective fails as the rank leaves the group,
so it named the rank only when the watchdog saw the process end within DEATH_REPORT_WAIT_S; a slower teardown
(seconds on a loaded host or a large device) gave "a TP collective failed: Connection closed by peer", naming
no rank, with the reason unread on the rank's link. Rank 0 now reads that reason from the link itself."""

from __future__ import annotations

import time

import pytest
import torch

from pdlaunch.distributed.message_stream import recv, send
from pdlaunch.distributed.messages import Execute, RankFailed, Reply
from pdlaunch.distributed.tp_ranks import DEATH_REPORT_WAIT_S
from pdlaunch.errors import EngineError
from pdlaunch.runner.step_inputs import StepInputs
from tests.distributed.test_rank_stream import rank0_side

WHY = "TP rank 2 failed: RuntimeError: CUDA error: an illegal memory access was encountered"
STEP = StepInputs(input_ids=torch.tensor([5]), positions=torch.tensor([0]), query_lens=[1], context_lens=[0],
                  slot_mapping=[torch.tensor([16])], block_tables=[torch.tensor([[1]])], sample_rows=[0])


class PeerLeft:
    """Rank 0's own shard: its collective fails as a peer leaves the group (gloo's error names no rank)."""

    def run(self, inputs: StepInputs) -> torch.Tensor:
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:46312")


def test_a_failed_step_names_the_rank_by_the_reason_it_sent_while_it_still_tears_down() -> None:
    executor, (rank1, rank2) = rank0_side(2)
    executor.runner = PeerLeft()  # type: ignore[assignment]  # a stand-in runner
    send(rank1, Reply(True))  # a rank 0 that reads the links must take only a RankFailed as a reason
    send(rank2, RankFailed(WHY))  # its process runs on (its teardown): the watchdog sees no end
    began = time.monotonic()
    with pytest.raises(EngineError) as err:
        executor.execute(STEP)
    assert err.value.message.startswith(WHY), err.value.message
    assert "TP rank 2 on node 1 (10.0.0.2)" in err.value.message, err.value.message
    assert time.monotonic() - began < DEATH_REPORT_WAIT_S, "it waited for a watchdog report that cannot come"
    with pytest.raises(EngineError, match="illegal memory access"):
        executor.check_health()
    assert recv(rank1, "rank 0") == Execute(STEP) and recv(rank2, "rank 0") == Execute(STEP)


def test_a_failed_step_with_no_reason_sent_still_says_the_collective_failed() -> None:
    executor, (rank1,) = rank0_side(1)
    executor.runner = PeerLeft()  # type: ignore[assignment]  # a stand-in runner
    with pytest.raises(EngineError, match="a TP collective failed: .*Connection closed by peer"):
        executor.execute(STEP)
