"""The TP stream's messages (pdlaunch/distributed/messages.py): each one crosses a real pipe intact,
and anything else that arrives is an error naming the peer and what it sent."""

from __future__ import annotations

import pickle
from multiprocessing import Pipe

import pytest
import torch

from pdlaunch.distributed.message_stream import UnexpectedMessage, recv, recv_as, send
from pdlaunch.distributed.messages import (
    AbortLoad,
    Execute,
    ForgetEngine,
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
from pdlaunch.kv_transfer.base import KVConnectorEvents
from pdlaunch.kv_transfer.params import PrefillAnswer
from pdlaunch.runner.step_inputs import StepInputs

PARAMS = PrefillAnswer(do_remote_prefill=True, remote_engine_id="p0", remote_request_id="p0-r1",
                       remote_block_ids=[[3, 4]])

MESSAGES: list[Message] = [
    Setup("cuda", "bfloat16", 4096),
    StartLoad("r1", [1, 2, 3], PARAMS, [[7, 8]], 0, 3),
    RequestFinished("r1", [1, 2, 3], None, [[7, 8]]),
    GetFinished(),
    AbortLoad("r1"),
    ReleaseUnloaded("r1", [1, 2, 3], PARAMS),
    ReleaseHeld("r1"),
    ForgetEngine("decode-engine-0"),
    Shutdown(),
    Hello(3),
    Ready("engine-0", 5601, "10.0.0.2"),
    Ready("engine-0", None, None),
    Reply((True, PARAMS)),
    Reply(KVConnectorEvents(finished_recving={"r1"}, failed_recving={"r2": "peer gone"})),
    RankFailed("TP rank 1 failed: out of memory"),
]


def roundtrip(message: Message) -> Message:
    here, there = Pipe()
    send(here, message)
    return recv(there, "TP rank 1")


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_crosses_a_pipe_intact(message: Message) -> None:
    got = roundtrip(message)
    assert type(got) is type(message) and got == message


def test_step_message_carries_its_tensors() -> None:
    inputs = StepInputs(input_ids=torch.tensor([5, 6, 7]), positions=torch.tensor([0, 1, 2]), query_lens=[3],
                        context_lens=[0], slot_mapping=[torch.tensor([16, 17, 18])],
                        block_tables=[torch.tensor([[2, -1]])], sample_rows=[2], prompt_rows=[0, 1],
                        prompt_targets=[6, 7], prompt_top_k=2)
    got = roundtrip(Execute(inputs))
    assert isinstance(got, Execute)
    assert torch.equal(got.inputs.input_ids, inputs.input_ids) and torch.equal(got.inputs.positions, inputs.positions)
    assert torch.equal(got.inputs.slot_mapping[0], inputs.slot_mapping[0])
    assert torch.equal(got.inputs.block_tables[0], inputs.block_tables[0])
    assert (got.inputs.query_lens, got.inputs.sample_rows, got.inputs.prompt_targets, got.inputs.prompt_top_k) == (
        [3], [2], [6, 7], 2)


def test_which_calls_are_answered() -> None:
    assert StartLoad.reply_type is None and ReleaseUnloaded.reply_type is None
    assert (RequestFinished.reply_type, GetFinished.reply_type, AbortLoad.reply_type, ReleaseHeld.reply_type,
            ForgetEngine.reply_type) == (tuple, KVConnectorEvents, bool, bool, int)


def test_messages_are_immutable() -> None:
    with pytest.raises(AttributeError):
        Hello(1).rank = 2  # type: ignore[misc]  # the point: frozen


@pytest.mark.parametrize("arrived", [("ready", "engine-0", 5601, "10.0.0.2"), {"kind": "hello"}, None],
                         ids=["old tuple", "dict", "None"])
def test_anything_else_is_an_error_naming_the_peer_and_what_arrived(arrived: object) -> None:
    here, there = Pipe()
    here.send_bytes(pickle.dumps(arrived))
    with pytest.raises(UnexpectedMessage) as err:
        recv(there, "TP rank 2 on node 1 (10.0.0.2)")
    text = str(err.value)
    assert "TP rank 2 on node 1 (10.0.0.2) sent" in text and repr(arrived)[:20] in text
    assert type(arrived).__name__ in text and "same pdlaunch version" in text
    assert err.value.peer == "TP rank 2 on node 1 (10.0.0.2)" and err.value.arrived == arrived


def test_a_message_this_version_cannot_read_is_the_same_error() -> None:
    here, there = Pipe()
    # A class that exists only in another version: pickle names a module attribute that is not here.
    here.send_bytes(pickle.dumps(Hello(1)).replace(b"Hello", b"Howdy"))
    unreadable = r"rank 0 sent a message this version cannot read \("
    with pytest.raises(UnexpectedMessage, match=unreadable + "AttributeError: .*Howdy"):
        recv(there, "rank 0")
    here.send_bytes(b"not a pickle")
    with pytest.raises(UnexpectedMessage, match=unreadable + "Unpickling") as err:
        recv(there, "rank 0")
    assert err.value.arrived == b"not a pickle"


def test_recv_as_names_the_message_it_waited_for() -> None:
    here, there = Pipe()
    send(here, Setup("cpu", "float32", 256))
    assert recv_as(there, "rank 0", Setup) == Setup("cpu", "float32", 256)
    send(here, Reply(True))
    with pytest.raises(UnexpectedMessage, match=r"rank 0 of decode-0 sent Reply .* where Setup was expected"):
        recv_as(there, "rank 0 of decode-0", Setup)


def test_a_closed_pipe_is_eof_not_a_message_error() -> None:
    here, there = Pipe()
    here.close()
    with pytest.raises(EOFError):
        recv(there, "rank 0")


def test_send_refuses_what_is_not_a_message() -> None:
    here, _ = Pipe()
    with pytest.raises(TypeError, match="not a TP message"):
        send(here, ("shutdown",))  # type: ignore[arg-type]  # the point: tuples are gone
