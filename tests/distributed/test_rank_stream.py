"""Both ends of the TP stream speaking messages.py: a worker's serve loop, mirrored connector calls,
and rank 0's link listener refusing a peer that greets it with something else."""

from __future__ import annotations

import logging
import os
import pickle
import threading
from multiprocessing import Pipe
from multiprocessing.connection import Client, Connection
from typing import Any

import pytest
import torch

from pdlaunch.distributed.message_stream import UnexpectedMessage, recv, send
from pdlaunch.distributed.messages import (
    AbortLoad,
    Execute,
    GetFinished,
    Hello,
    RankFailed,
    Ready,
    ReleaseHeld,
    ReleaseUnloaded,
    Reply,
    RequestFinished,
    Shutdown,
    StartLoad,
)
from pdlaunch.distributed.rank_listener import RankListener
from pdlaunch.distributed.tp_connector import rank_connector_call
from pdlaunch.distributed.tp_executor import TPExecutor
from pdlaunch.distributed.tp_ranks import TPRanks
from pdlaunch.distributed.tp_startup import wait_ready
from pdlaunch.distributed.worker import _serve
from pdlaunch.errors import EngineError
from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector, KVConnectorEvents
from pdlaunch.kv_transfer.params import PrefillAnswer
from pdlaunch.runner.step_inputs import StepInputs
from tests.tp.test_tp_connector_drain import ScriptedRank

KEY = b"test-link-key"


class RecordingConnector(ScriptedRank):
    """Records what each mirrored call handed it."""

    def __init__(self) -> None:
        super().__init__(busy_on_abort=True)
        self.calls: list[tuple[str, Any]] = []

    def start_load(self, *args: Any) -> None:
        self.calls.append(("start_load", args))

    def request_finished(self, *args: Any) -> tuple[bool, PrefillAnswer | None]:
        self.calls.append(("request_finished", args))
        return True, PrefillAnswer(do_remote_prefill=True, remote_engine_id="p", remote_request_id=args[0],
                                   remote_block_ids=args[3])

    def release_held(self, request_id: str) -> bool:
        self.calls.append(("release_held", request_id))
        return True

    def release_unloaded(self, *args: Any) -> None:
        self.calls.append(("release_unloaded", args))

    def register_kv_caches(self, spec: KVCacheSpec) -> None:
        pass


class RecordingRunner:
    def __init__(self) -> None:
        self.steps: list[Any] = []

    def run(self, inputs: Any) -> None:
        self.steps.append(inputs)


def test_mirrored_calls_reach_the_rank_connector_with_its_own_prefill_rank() -> None:
    connector = RecordingConnector()
    params = PrefillAnswer(do_remote_prefill=True, remote_engine_id="p", remote_request_id="r", tp_size=2,
                           remote_ports=[5600, 5601], remote_hosts=["a", "b"])
    assert rank_connector_call(connector, 1, 2, StartLoad("r", [1, 2], params, [[4]], 0, 2)) is None
    loaded = connector.calls[0][1]
    assert (loaded[0], loaded[2].remote_port, loaded[2].remote_host) == ("r", 5601, "b")  # rank 1 reads rank 1
    assert rank_connector_call(connector, 1, 2, RequestFinished("r", [1, 2], None, [[4]])) == (
        True, PrefillAnswer(do_remote_prefill=True, remote_engine_id="p", remote_request_id="r",
                            remote_block_ids=[[4]]))
    assert rank_connector_call(connector, 1, 2, AbortLoad("r")) is True and connector.aborted == ["r"]
    assert rank_connector_call(connector, 1, 2, ReleaseHeld("r")) is True
    # a request that ended before its load: rank 1 tells the prefill rank it would have read
    assert rank_connector_call(connector, 1, 2, ReleaseUnloaded("r", [1, 2], params)) is None
    name, released = connector.calls[-1]
    assert (name, released[0], released[2].remote_port, released[2].remote_host) == ("release_unloaded", "r", 5601, "b")
    assert isinstance(rank_connector_call(connector, 1, 2, GetFinished()), KVConnectorEvents)


def run_worker_loop(conn: Connection, connector: KVConnector | None, runner: RecordingRunner) -> None:
    _serve(1, 2, runner, connector, conn, os.getppid())  # type: ignore[arg-type]  # a stand-in runner


def test_worker_runs_steps_answers_calls_that_want_it_and_stops_on_shutdown() -> None:
    rank0, worker = Pipe()
    connector, runner = RecordingConnector(), RecordingRunner()
    step = StepInputs(input_ids=torch.tensor([5]), positions=torch.tensor([0]), query_lens=[1], context_lens=[0],
                      slot_mapping=[torch.tensor([16])], block_tables=[torch.tensor([[1]])], sample_rows=[0])
    for message in (Execute(step), StartLoad("r", [1], None, [[2]], 0, 1), ReleaseHeld("r"), GetFinished(),
                    Shutdown()):
        send(rank0, message)
    run_worker_loop(worker, connector, runner)  # returns on Shutdown
    assert [s.input_ids.tolist() for s in runner.steps] == [[5]]
    assert [name for name, _ in connector.calls] == ["start_load", "release_held"]
    assert recv(rank0, "TP rank 1") == Reply(True)  # release_held; start_load is not answered
    assert recv(rank0, "TP rank 1") == Reply(KVConnectorEvents())
    assert not rank0.poll(0)


def test_worker_fails_on_a_message_it_does_not_know_naming_rank_0() -> None:
    rank0, worker = Pipe()
    rank0.send_bytes(pickle.dumps(("execute", "step-1")))  # an older rank 0's tuple
    with pytest.raises(UnexpectedMessage, match=r"rank 0 sent tuple \('execute'"):
        run_worker_loop(worker, None, RecordingRunner())


def test_worker_without_connector_refuses_a_mirrored_call() -> None:
    rank0, worker = Pipe()
    send(rank0, AbortLoad("r"))
    with pytest.raises(RuntimeError, match="AbortLoad but TP rank 1 has no connector"):
        run_worker_loop(worker, None, RecordingRunner())


def greet(address: str, greeting: bytes) -> None:
    host, port = address.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=KEY)
    conn.send_bytes(greeting)
    conn.poll(5)  # keep the link open while rank 0 decides
    conn.close()


def test_listener_accepts_a_hello_and_refuses_an_old_tuple_naming_the_peer(caplog: pytest.LogCaptureFixture) -> None:
    listener = RankListener("127.0.0.1", KEY)
    try:
        peer = threading.Thread(target=greet, args=(listener.address, pickle.dumps(Hello(1))), daemon=True)
        peer.start()
        conns = listener.accept({1: "node 1 (127.0.0.1)"}, timeout_s=10)
        assert list(conns) == [1]
        conns[1].close()
        peer.join(10)

        stranger = threading.Thread(target=greet, args=(listener.address, pickle.dumps(("hello", 1))), daemon=True)
        stranger.start()
        missing = "TP rank 1 on node 1 .* did not connect"
        with caplog.at_level(logging.WARNING), pytest.raises(EngineError, match=missing):
            listener.accept({1: "node 1 (127.0.0.1)"}, timeout_s=2)
        stranger.join(10)
    finally:
        listener.close()
    refused = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(refused) == 1 and "a peer at 127.0.0.1:" in refused[0] and "tuple ('hello', 1)" in refused[0], refused


def rank0_side(worker_ends: int) -> tuple[TPExecutor, list[Connection]]:
    """Rank 0's executor with only its links (ranks 1.. on node 1): enough for its receiving half."""
    pairs = [Pipe() for _ in range(worker_ends)]
    ranks = TPRanks("engine", worker_ends + 1)
    ranks.links = [rank0 for rank0, _ in pairs]  # the links alone, no processes
    ranks.remote = {r: "node 1 (10.0.0.2)" for r in range(1, worker_ends + 1)}
    executor = TPExecutor.__new__(TPExecutor)
    executor._ranks, executor.failure = ranks, None  # noqa: SLF001
    return executor, [worker for _, worker in pairs]


def test_rank0_takes_replies_of_the_type_the_call_answers_with() -> None:
    executor, (rank1, rank2) = rank0_side(2)
    send(rank1, Reply(True))
    send(rank2, Reply(False))
    assert executor._mirror(AbortLoad("r")) == [True, False]  # noqa: SLF001
    assert recv(rank1, "rank 0") == AbortLoad("r") and recv(rank2, "rank 0") == AbortLoad("r")
    assert executor._mirror(StartLoad("r", [1], None, [[2]], 0, 1)) == []  # noqa: SLF001 - not answered


@pytest.mark.parametrize(("answer", "said"), [
    (Reply({"finished": []}), r"a malformed reply to GetFinished \(the value is a dict, not KVConnectorEvents\)"),
    (Ready("e", None, None), r"Ready .* where the reply to GetFinished was expected"),
], ids=["wrong reply", "ready"])
def test_rank0_names_the_rank_whose_answer_does_not_fit(answer: Reply | Ready, said: str) -> None:
    executor, (rank1,) = rank0_side(1)
    send(rank1, answer)
    with pytest.raises(UnexpectedMessage, match=r"TP rank 1 on node 1 \(10.0.0.2\) sent " + said):
        executor._mirror(GetFinished())  # noqa: SLF001


def test_rank0_reports_a_rank_failure_and_a_stray_message_at_startup() -> None:
    executor, (rank1,) = rank0_side(1)
    send(rank1, RankFailed("TP rank 1 failed: no memory"))
    with pytest.raises(EngineError, match="TP rank 1 failed: no memory"):
        executor._mirror(GetFinished())  # noqa: SLF001
    send(rank1, Ready("e1", 5601, "10.0.0.2"))
    assert wait_ready(executor._ranks, 1) == Ready("e1", 5601, "10.0.0.2")  # noqa: SLF001
    send(rank1, Reply(True))
    with pytest.raises(UnexpectedMessage, match="sent Reply .* where Ready was expected"):
        wait_ready(executor._ranks, 1)  # noqa: SLF001
