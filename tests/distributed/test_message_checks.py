"""Every message a TP rank link delivers is checked where it arrives (messages.recv, and a call's reply where
rank 0 awaits it): the fields' types, ranges and lengths. A message of the right class with the wrong contents
went on: a Reply to RequestFinished was checked only as "a tuple" (the engine thread then unpacked it, or
handed a dict on as kv_transfer_params), a remote rank built itself from a Setup it never looked at, and a
Hello with an unhashable rank raised TypeError out of RankListener.accept. Each is now a MalformedMessage (an
UnexpectedMessage) naming the peer, the message and what was wrong, and rank 0 fails the instance with it."""

from __future__ import annotations

import logging
import os
import pickle
import threading
import types
from multiprocessing import Pipe
from multiprocessing.connection import Client

import pytest
import torch

from pdlaunch.distributed import ray_executor
from pdlaunch.distributed.message_stream import MalformedMessage, recv, recv_as, send
from pdlaunch.distributed.messages import (
    AbortLoad,
    Execute,
    GetFinished,
    Hello,
    Message,
    RankFailed,
    Ready,
    ReleaseHeld,
    ReleaseUnloaded,
    Reply,
    RequestFinished,
    Setup,
    Shutdown,
    StartLoad,
)
from pdlaunch.distributed.rank_listener import RankListener
from pdlaunch.distributed.tp_connector import rank_connector_call
from pdlaunch.distributed.tp_startup import wait_ready
from pdlaunch.distributed.worker import _serve
from pdlaunch.errors import EngineError
from pdlaunch.kv_transfer.base import KVConnectorEvents, LoadOutcome
from pdlaunch.kv_transfer.params import PrefillAnswer
from pdlaunch.runner.step_inputs import StepInputs
from tests.distributed.test_rank_stream import RecordingConnector, RecordingRunner, rank0_side
from tests.tp.test_tp_connector_drain import ScriptedRank

KEY = b"test-link-key"
PEER = "TP rank 1 on node 1 (10.0.0.2)"
PARAMS = PrefillAnswer(do_remote_prefill=True, remote_engine_id="p0", remote_request_id="p0-r1",
                       remote_block_ids=[[3, 4]])
FINISHED = RequestFinished("r1", [1, 2, 3], None, [[7, 8]])


def step(**change: object) -> StepInputs:
    fields: dict[str, object] = {
        "input_ids": torch.tensor([5, 6]), "positions": torch.tensor([0, 1]), "query_lens": [2], "context_lens": [0],
        "slot_mapping": [torch.tensor([16, 17])], "block_tables": [torch.tensor([[2]])], "sample_rows": [1]}
    return StepInputs(**{**fields, **change})  # type: ignore[arg-type]  # the point: some are wrong


# (message with a field that does not hold what it carries, what the error says is wrong)
MALFORMED: list[tuple[Message, str]] = [
    (Setup("cuda", "bfloat16", -1), "max_model_len is -1, out of range"),
    (Setup("cuda", "bfloat16", "4096"), "max_model_len is a str, not an int"),  # type: ignore[arg-type]
    (Setup("cuda", "bfloat16", True), "max_model_len is a bool, not an int"),
    (Setup("tpu", "bfloat16", 4096), "device_type is 'tpu', not one of cuda, cpu"),
    (Setup("cuda", "int4", 4096), "dtype_name is 'int4', not one of auto, float32, bfloat16, float16"),
    (Execute("step-1"), "inputs is a str, not StepInputs"),  # type: ignore[arg-type]
    (Execute(step(positions=torch.tensor([0]))), "input_ids (2,) and positions (1,) differ"),
    (Execute(step(block_tables=[])), "slot_mapping and block_tables are not lists of one entry per KV-cache group"),
    (StartLoad(7, [1], None, [[2]], 0, 1), "request_id is an int, not a str"),  # type: ignore[arg-type]
    (StartLoad("r", (1,), None, [[2]], 0, 1), "prompt_token_ids is a tuple, not a list"),  # type: ignore[arg-type]
    (StartLoad("r", [1], {"remote_port": 1}, [[2]], 0, 1),  # type: ignore[arg-type]
     "kv_transfer_params is a dict, not kv_transfer_params or None"),
    (StartLoad("r", [1], None, [2], 0, 1), "block_ids holds an int, not a list of block ids"),  # type: ignore[list-item]
    (StartLoad("r", [1], None, [[2]], -1, 1), "num_local_computed_tokens is -1, out of range"),
    (RequestFinished("r", [1], None, "7"), "block_ids is a str, not a list"),  # type: ignore[arg-type]
    (AbortLoad(None), "request_id is a NoneType, not a str"),  # type: ignore[arg-type]
    (ReleaseUnloaded("r", [1], {"remote_port": 1}),  # type: ignore[arg-type]
     "kv_transfer_params is a dict, not kv_transfer_params or None"),
    (ReleaseHeld(["r"]), "request_id is a list, not a str"),  # type: ignore[arg-type]
    (Hello([1]), "rank is a list, not an int"),  # type: ignore[arg-type]
    (Hello(0), "rank is 0, out of range"),
    (Hello(1.0), "rank is a float, not an int"),  # type: ignore[arg-type]
    (Ready("", 5601, "10.0.0.2"), "engine_id is str '', not a non-empty str"),
    (Ready("e1", 70000, "10.0.0.2"), "side_channel_port is 70000, out of range [1, 65535]"),
    (Ready("e1", 5601, b"10.0.0.2"), "side_channel_host is bytes"),  # type: ignore[arg-type]
    (RankFailed(RuntimeError("oom")), "message is a RuntimeError, not a str"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("message", "wrong"), MALFORMED,
                         ids=[f"{type(m).__name__}-{w.split()[0]}" for m, w in MALFORMED])
def test_a_message_with_a_field_that_does_not_fit_is_an_error_naming_the_peer_and_the_field(
        message: Message, wrong: str) -> None:
    here, there = Pipe()
    send(here, message)
    with pytest.raises(MalformedMessage) as err:
        recv(there, PEER)
    assert err.value.message.startswith(f"{PEER} sent a malformed {type(message).__name__} ("), err.value
    assert wrong in err.value.problem, err.value
    assert err.value.peer == PEER and type(err.value.arrived) is type(message) and err.value.field == "parallel.tp"


def test_a_setup_that_does_not_fit_fails_the_receiving_rank() -> None:
    here, there = Pipe()
    send(here, Setup("cuda", "bfloat16", 0))
    with pytest.raises(MalformedMessage, match=r"rank 0 of decode-0 sent a malformed Setup \(max_model_len is 0"):
        recv_as(there, "rank 0 of decode-0", Setup)
    send(here, Setup("cpu", "auto", 4096))
    assert recv_as(there, "rank 0 of decode-0", Setup) == Setup("cpu", "auto", 4096)


@pytest.mark.parametrize(("value", "wrong"), [
    (("yes", None), "hold is a str, not a bool"),
    ((True, {"remote_port": 5600}), "kv_transfer_params is a dict, not a PrefillAnswer or None"),
    ((True,), "the value is a tuple of 1, not a pair (hold, kv_transfer_params)"),
    ((True, None, None), "the value is a tuple of 3, not a pair"),
    ([True, None], "the value is a list, not a pair"),
], ids=["hold", "params", "short", "long", "list"])
def test_a_reply_to_request_finished_must_be_hold_and_params(value: object, wrong: str) -> None:
    executor, (rank1,) = rank0_side(1)
    send(rank1, Reply(value))
    with pytest.raises(MalformedMessage) as err:
        executor._mirror(FINISHED)  # noqa: SLF001
    assert err.value.message.startswith(f"{PEER} sent a malformed reply to RequestFinished ({wrong}"), err.value
    # The later ranks' replies stay unread on their links: the instance cannot go on.
    with pytest.raises(EngineError, match="malformed reply to RequestFinished"):
        executor.check_health()


@pytest.mark.parametrize("value", [(True, PARAMS), (False, None)], ids=["held", "not held"])
def test_a_reply_to_request_finished_that_fits_is_taken(value: tuple[bool, PrefillAnswer | None]) -> None:
    executor, (rank1,) = rank0_side(1)
    send(rank1, Reply(value))
    assert executor._mirror(FINISHED) == [value]  # noqa: SLF001
    assert executor.failure is None


@pytest.mark.parametrize(("events", "wrong"), [
    (KVConnectorEvents(finished_sending=["r1"]), "finished_sending is a list, not a set"),  # type: ignore[arg-type]
    (KVConnectorEvents(finished_recving={1}), "finished_recving holds an int, not a request id"),  # type: ignore[arg-type]
    (KVConnectorEvents(failed_recving={"r1": None}), "failed_recving holds an error that is not a str"),  # type: ignore[dict-item]
    (KVConnectorEvents(load_outcomes={"r1": "done"}), r"load_outcomes\['r1'\] is a str, not a LoadOutcome"),  # type: ignore[dict-item]
    (KVConnectorEvents(load_outcomes={"r1": LoadOutcome("done", -1)}), r"load_outcomes\['r1'\]: num_bytes is -1"),
    (KVConnectorEvents(load_outcomes={"r1": LoadOutcome("done", 1, float("nan"))}),
     r"load_outcomes\['r1'\]: load_seconds is nan, not seconds"),
    (KVConnectorEvents(load_outcomes={"r1": LoadOutcome("done", 1, 0.5, 1e300)}),
     r"load_outcomes\['r1'\]: xfer_seconds is 1e\+300, not seconds"),
    (KVConnectorEvents(load_outcomes={"r1": LoadOutcome("lost")}), r"load_outcomes\['r1'\]: end is 'lost'"),  # type: ignore[arg-type]
], ids=["list", "int id", "error", "outcome type", "bytes", "nan", "huge", "end"])
def test_a_reply_to_get_finished_must_hold_request_ids(events: KVConnectorEvents, wrong: str) -> None:
    executor, (rank1,) = rank0_side(1)
    send(rank1, Reply(events))
    with pytest.raises(MalformedMessage, match=r"sent a malformed reply to GetFinished \(" + wrong):
        executor._mirror(GetFinished())  # noqa: SLF001


def test_a_reply_to_get_finished_with_the_ends_of_loads_is_taken() -> None:
    events = KVConnectorEvents(finished_recving={"r1"}, load_outcomes={
        "r1": LoadOutcome("done", 4096, 0.5, 0.125), "r2": LoadOutcome("done", 0, 0.25, None),
        "r3": LoadOutcome("failed"), "r4": LoadOutcome("aborted")})
    executor, (rank1,) = rank0_side(1)
    send(rank1, Reply(events))
    assert executor._mirror(GetFinished()) == [events]  # noqa: SLF001
    assert executor.failure is None


def test_a_reply_to_abort_load_must_be_a_bool() -> None:
    executor, (rank1,) = rank0_side(1)
    send(rank1, Reply("busy"))
    with pytest.raises(MalformedMessage, match=r"malformed reply to AbortLoad \(the value is a str, not a bool\)"):
        executor._mirror(AbortLoad("r"))  # noqa: SLF001


def test_a_connector_that_answers_abort_load_with_none_answers_false() -> None:
    """base.py lets abort_load return None (no transfer in flight): the rank answers a bool, as rank 0 checks."""

    class Quiet(ScriptedRank):
        def abort_load(self, request_id: str) -> None:  # type: ignore[override]  # base.py: bool | None
            return None

    assert rank_connector_call(Quiet(), 1, 2, AbortLoad("r")) is False


def test_a_malformed_ready_fails_the_startup_naming_the_rank() -> None:
    executor, (rank1,) = rank0_side(1)
    send(rank1, Ready("e1", 0, "10.0.0.2"))
    with pytest.raises(MalformedMessage) as err:
        wait_ready(executor._ranks, 1)  # noqa: SLF001
    assert err.value.message.startswith(f"{PEER} sent a malformed Ready (side_channel_port is 0, out of range"), err


def test_the_worker_fails_on_a_malformed_call_before_its_connector_sees_it() -> None:
    rank0, worker = Pipe()
    connector = RecordingConnector()
    send(rank0, StartLoad("r", [1], None, 5, 0, 1))  # type: ignore[arg-type]
    send(rank0, Shutdown())  # what ends a loop that took the call
    with pytest.raises(MalformedMessage, match=r"rank 0 sent a malformed StartLoad \(block_ids is an int"):
        _serve(1, 2, RecordingRunner(), connector, worker, os.getppid())  # type: ignore[arg-type]  # a stand-in
    assert connector.calls == []


def greet(address: str, hello: object) -> None:
    host, port = address.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=KEY)
    conn.send_bytes(pickle.dumps(hello))
    conn.poll(10)  # keep the link open while rank 0 decides
    conn.close()


@pytest.mark.parametrize(("rank", "wrong"), [([1], "rank is a list, not an int"), (True, "rank is a bool"),
                                             (0, "rank is 0, out of range")], ids=["unhashable", "bool", "rank 0"])
def test_a_hello_with_a_rank_that_does_not_fit_is_refused_naming_the_peer(
        rank: object, wrong: str, caplog: pytest.LogCaptureFixture) -> None:
    listener = RankListener("127.0.0.1", KEY)
    stranger = threading.Thread(target=greet, args=(listener.address, Hello(rank)), daemon=True)  # type: ignore[arg-type]
    stranger.start()
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(EngineError) as err:
            listener.accept({1: "node 1 (127.0.0.1)"}, timeout_s=2)
    finally:
        listener.close()
        stranger.join(20)
    assert err.value.message.startswith("TP rank 1 on node 1 (127.0.0.1) did not connect"), err.value
    assert "refused meanwhile: a peer at 127.0.0.1:" in err.value.message and wrong in err.value.message, err.value
    refused = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(refused) == 1 and f"sent a malformed Hello ({wrong}" in refused[0], refused


class Answers(types.ModuleType):
    """The ray module with every call already answered by `value`."""

    def __init__(self, value: object, exceptions: object) -> None:
        super().__init__("ray")
        self.value, self.exceptions = value, exceptions

    def get(self, refs: list[object], timeout: float | None = None) -> list[object]:
        return [self.value for _ in refs]


def test_a_ray_rank_reply_to_request_finished_must_be_hold_and_params() -> None:
    ray = pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")
    executor = ray_executor.RayTPExecutor.__new__(ray_executor.RayTPExecutor)
    executor._ray = Answers(("yes", None), ray.exceptions)  # noqa: SLF001
    call = types.SimpleNamespace(remote=lambda call: "ref-1")
    executor._actors = [types.SimpleNamespace(connector_call=call)]  # noqa: SLF001
    executor._nodes, executor._pending, executor.failure = ["10.0.0.1", "10.0.0.2"], {}, None  # noqa: SLF001
    with pytest.raises(MalformedMessage, match=r"TP rank 1 \(Ray actor on 10.0.0.2\) sent a malformed reply to "
                       r"RequestFinished \(hold is a str, not a bool\)"):
        executor._mirror(FINISHED)  # noqa: SLF001
    with pytest.raises(EngineError, match="malformed reply to RequestFinished"):
        executor.check_health()
