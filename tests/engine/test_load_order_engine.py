"""The engine side of a decode's load ordering (kv_transfer/decode/compute_order.py): with async scheduling, a
request aborted between steps loses its blocks while the forward of the step it was in may still write them, and
the next PD decode gets its partial last block first. That decode's start_load runs on the engine thread after the
step was launched and marks the compute stream there, so the mark covers that forward: its loader writes nothing
into the block before the forward ended.

A decode engine on CPU with its real NIXL decode connector; its compute stream is a fake that notes, for each
mark, how many steps had been launched and whether the last one was still unconfirmed (its sampled ids unread).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.kv_transfer.decode.side import DecodeSide
from tests.engine.conftest import MakeEngine
from tests.kv_transfer.deployment_secret import secured, signed

WAIT_S = 60.0  # generous: B's load fails within its handshake timeout, then B computes 13 tokens


class _Done:
    def query(self) -> bool:
        return True


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_load_into_blocks_freed_under_a_launched_step_marks_the_stream_after_that_launch(
        llama_ckpt: Path, make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    instance = InstanceSpec(role="decode", port=2, engine_id="D-order", device="cpu")
    # Nobody listens where B's prefill should be: its handshake fails (after this timeout) and B is recomputed.
    kv = KVTransferConfig(handshake_timeout_seconds=0.5)
    connector = DecodeSide(secured(DeploymentConfig(device="cpu", kv_transfer=kv)), instance)
    engine = make_engine(llama_ckpt, instance=instance, connector=connector, async_scheduling=True)
    assert engine.async_scheduling and engine.connector is connector
    launched: list[int] = []
    real_execute = engine.executor.execute

    def execute(inputs: Any) -> Any:
        launched.append(len(launched) + 1)
        return real_execute(inputs)

    monkeypatch.setattr(engine.executor, "execute", execute)
    marks: list[tuple[int, bool]] = []  # (steps launched, the last one unconfirmed) at each mark

    class _Stream:
        def mark(self) -> Any:
            marks.append((len(launched), engine._in_flight is not None))
            return _Done()

    connector.compute = _Stream()  # type: ignore[assignment]

    # A runs: its prompt (13 tokens: the second block partial), then its first decode step, launched and unread.
    engine.add_request("A", list(range(3, 16)), SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.step()
    assert launched == [1, 2] and engine._in_flight is not None
    a_last = engine.block_manager.block_ids("A")[0][-1]
    engine.abort_request("A")  # between steps: step 2 may still write A's blocks

    params = signed({"do_remote_prefill": True, "remote_engine_id": "P", "remote_request_id": "p-b",
                     "remote_block_ids": [[0, 1]], "remote_host": "127.0.0.1", "remote_port": _closed_port()})
    engine.add_request("B", list(range(20, 33)), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                       kv_transfer_params=params)
    engine.step()  # admits B: its blocks, then start_load, while step 2 is in flight
    assert a_last in engine.block_manager.block_ids("B")[0], "B did not get A's partial block: no hazard here"
    assert marks == [(2, True)], "the load's mark was not taken after the step that may write its blocks"

    deadline = time.monotonic() + WAIT_S
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        engine.step()
    assert not engine.has_unfinished_requests(), f"B did not end within {WAIT_S:g}s"
