"""A TP worker that dies before the group has formed (killed at start, or failing its checkpoint) is noticed
as it exits, not when rank 0's join times out: the error names the rank, how it ended and where its log is."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pdlaunch.distributed import parallel_state, tp_startup
from pdlaunch.errors import EngineError
from tests.distributed.rank_exits import killed_at_start
from tests.tp.conftest import MakeTPEngine
from tests.tp.test_audit_rank_startup import _break_the_worker

# Rank 0 would wait this long inside torch's join for a rank that never comes; the death must be reported in
# well under it (a loaded machine starts a worker process in seconds).
JOIN_WAIT_S = 120.0


def started_and_failed(make: MakeTPEngine, ckpt: Path) -> tuple[EngineError, float]:
    began = time.monotonic()
    with pytest.raises(EngineError) as err:
        make(ckpt, 2)
    return err.value, time.monotonic() - began


@pytest.mark.slow
def test_a_worker_killed_at_start_is_named_with_its_signal_and_log(  # type: ignore[no-untyped-def]
        llama_ckpt, make_tp_engine: MakeTPEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel_state, "COLLECTIVE_TIMEOUT_S", JOIN_WAIT_S)
    monkeypatch.setattr(tp_startup, "run_worker", killed_at_start)
    error, took = started_and_failed(make_tp_engine, llama_ckpt)
    assert took < JOIN_WAIT_S / 2, f"the dead rank was noticed after {took:.0f}s"
    assert error.field == "parallel.tp"
    assert "TP rank 1 (pid " in error.message
    assert error.message.endswith(") was killed by signal 9 (SIGKILL) during startup"), error.message
    assert error.hint is not None and "'engine rank 1'" in error.hint, error.hint


@pytest.mark.slow
def test_a_worker_failing_its_checkpoint_is_named_with_its_reason_and_exit_code(  # type: ignore[no-untyped-def]
        llama_ckpt, make_tp_engine: MakeTPEngine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _break_the_worker(monkeypatch, tmp_path / "not-a-checkpoint")
    monkeypatch.setattr(parallel_state, "COLLECTIVE_TIMEOUT_S", JOIN_WAIT_S)
    error, took = started_and_failed(make_tp_engine, llama_ckpt)
    assert took < JOIN_WAIT_S / 2, f"the dead rank was noticed after {took:.0f}s"
    assert error.message.startswith("TP rank 1 failed: ") and "not-a-checkpoint" in error.message, error.message
    assert error.message.endswith(") exited with code 1 during startup)"), error.message
