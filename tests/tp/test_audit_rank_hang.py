"""A TP worker that hangs (SIGSTOP) fails the engine by name, and shutdown still reaps it."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import pytest

from pdlaunch.distributed import parallel_state, tp_executor, tp_startup
from pdlaunch.distributed.tp_executor import TPExecutor
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import EngineError
from tests.tp.conftest import MakeTPEngine

GUARD_S = 120.0  # only bounds a broken test (a hang); the fixed engine answers within seconds


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.slow
def test_step_inputs_larger_than_the_pipe_to_a_stopped_rank_fail_by_name(  # type: ignore[no-untyped-def]
        llama_ckpt, make_tp_engine: MakeTPEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    # 64 prompts of 500 tokens in one step: the Execute message (~770 KiB) outgrows the socket
    # buffers, so sending it blocked for as long as the stopped rank was stopped.
    monkeypatch.setattr(tp_startup, "SEND_TIMEOUT_S", 3.0, raising=False)  # the bound on the links
    monkeypatch.setattr(tp_executor, "SEND_TIMEOUT_S", 3.0, raising=False)  # what the error says of it
    engine = make_tp_engine(llama_ckpt, 2, num_gpu_blocks=4200, max_num_batched_tokens=32768, max_num_seqs=64)
    assert isinstance(engine.executor, TPExecutor)
    (proc,) = engine.executor._ranks.procs.values()  # noqa: SLF001 - the test stops a real rank process
    assert proc.pid is not None
    pid = proc.pid
    for i in range(64):
        engine.add_request(f"r{i}", [(i * 7 + j) % 500 + 1 for j in range(500)],
                           SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    os.kill(pid, signal.SIGSTOP)
    try:
        step, errors = _in_thread(engine.step)
        step.join(GUARD_S)
        assert not step.is_alive(), "the step blocked sending to the stopped rank"
        assert len(errors) == 1 and isinstance(errors[0], EngineError), errors
        assert "TP rank 1" in str(errors[0]) and str(pid) in str(errors[0])
        stop, stop_errors = _in_thread(engine.shutdown)
        stop.join(GUARD_S)
        assert not stop.is_alive(), "shutdown blocked on the stopped rank"
        assert not stop_errors and not proc.is_alive()
    finally:
        if proc.is_alive():
            os.kill(pid, signal.SIGKILL)  # unblocks a broken engine so the fixture can shut it down


@pytest.mark.slow
def test_a_collective_timing_out_on_a_stopped_rank_names_it(  # type: ignore[no-untyped-def]
        llama_ckpt, make_tp_engine: MakeTPEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel_state, "COLLECTIVE_TIMEOUT_S", 5.0)  # rank 0's gloo timeout
    engine = make_tp_engine(llama_ckpt, 2)
    assert isinstance(engine.executor, TPExecutor)
    (proc,) = engine.executor._ranks.procs.values()  # noqa: SLF001 - the test stops a real rank process
    assert proc.pid is not None
    pid = proc.pid
    engine.add_request("r", [1, 2, 3, 4], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    os.kill(pid, signal.SIGSTOP)
    try:
        step, errors = _in_thread(engine.step)
        step.join(GUARD_S)
        assert not step.is_alive() and len(errors) == 1 and isinstance(errors[0], EngineError), errors
        assert f"TP rank 1 (pid {pid}) stopped" in str(errors[0]), str(errors[0])
    finally:
        os.kill(pid, signal.SIGKILL)
