"""forget_engine on a TP instance: every rank loaded its own agents of a dead peer engine, so rank 0 mirrors the
call to ranks 1..T-1 (ForgetEngine over the rank stream, as the other scheduler-side calls) and adds up what each
rank dropped; a rank's answer that is not a count is a malformed reply."""

from __future__ import annotations

import os
from multiprocessing import Pipe
from typing import Any

import pytest

from pdlaunch.distributed.message_stream import MalformedMessage, recv, send
from pdlaunch.distributed.messages import ConnectorCall, ForgetEngine, Reply, Shutdown
from pdlaunch.distributed.tp_connector import TPConnector, rank_connector_call
from pdlaunch.distributed.worker import _serve
from tests.distributed.test_rank_stream import RecordingRunner, rank0_side
from tests.tp.test_tp_connector_drain import ScriptedRank


class ForgettingRank(ScriptedRank):
    """A rank's connector that knows `agents` agents of each engine id."""

    def __init__(self, agents: dict[str, int]) -> None:
        super().__init__()
        self.agents = agents
        self.forgot: list[str] = []

    def forget_engine(self, engine_id: str) -> int:
        self.forgot.append(engine_id)
        return self.agents.pop(engine_id, 0)


def test_rank0_forgets_on_every_rank_and_counts_their_agents() -> None:
    rank0, rank1, rank2 = ForgettingRank({"D0": 1}), ForgettingRank({"D0": 2}), ForgettingRank({"D1": 1})
    sent: list[ConnectorCall] = []

    def mirror(call: ConnectorCall) -> list[Any]:
        sent.append(call)
        return [rank_connector_call(rank, r, 3, call) for r, rank in ((1, rank1), (2, rank2))]

    tp = TPConnector(rank0, 3, mirror, [None, None, None])
    assert tp.forget_engine("D0") == 3
    assert sent == [ForgetEngine("D0")] and rank0.forgot == rank1.forgot == rank2.forgot == ["D0"]
    assert tp.forget_engine("D0") == 0 and rank2.agents == {"D1": 1}


def test_a_worker_answers_forget_engine_with_its_count() -> None:
    rank0, worker = Pipe()
    connector = ForgettingRank({"P0": 2})
    for message in (ForgetEngine("P0"), ForgetEngine("P0"), Shutdown()):
        send(rank0, message)
    _serve(1, 2, RecordingRunner(), connector, worker, os.getppid())  # type: ignore[arg-type]  # returns on Shutdown
    assert recv(rank0, "TP rank 1") == Reply(2) and recv(rank0, "TP rank 1") == Reply(0)
    assert connector.forgot == ["P0", "P0"]


def test_the_mirrored_call_reaches_rank_r_over_its_link_and_its_count_is_checked() -> None:
    executor, (rank1,) = rank0_side(1)
    send(rank1, Reply(1))
    assert executor._mirror(ForgetEngine("D0")) == [1]  # noqa: SLF001
    assert recv(rank1, "rank 0") == ForgetEngine("D0")
    for wrong, said in ((True, "the value is a bool, not an int"), (-1, r"the value is -1, out of range \[0, ...\]"),
                        ("1", "the value is a str, not an int")):
        executor, (rank1,) = rank0_side(1)
        send(rank1, Reply(wrong))
        with pytest.raises(MalformedMessage, match=rf"malformed reply to ForgetEngine \({said}\)"):
            executor._mirror(ForgetEngine("D0"))  # noqa: SLF001


def test_a_forget_engine_of_no_engine_id_is_malformed() -> None:
    assert ForgetEngine("D0").problem() is None
    assert ForgetEngine(7).problem() == "engine_id is an int, not a str"  # type: ignore[arg-type]
