"""TP group lifecycle: engine_id as every rank holds it, and a dying rank failing the engine by name."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pdlaunch.config.deployment_config import InstanceSpec
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import EngineError
from tests.tp.conftest import MakeTPEngine

DEATH_GUARD_S = 30.0  # only bounds a broken test; the engine fails on its next step


@pytest.mark.slow
def test_rank_engine_ids_all_equal_the_instance_engine_id(llama_ckpt, make_tp_engine: MakeTPEngine) -> None:  # type: ignore[no-untyped-def]
    # Workers start from their own fresh engine_id (as a rank on another node would): only the
    # broadcast from rank 0 makes them agree.
    spec = InstanceSpec(role="colocated", port=1, tp=2, engine_id="tp-instance-0")
    engine = make_tp_engine(llama_ckpt, 2, instance=spec)
    assert engine.engine_id == "tp-instance-0"
    assert engine.rank_engine_ids == ["tp-instance-0", "tp-instance-0"]


def _worker_pid(engine) -> int:  # type: ignore[no-untyped-def]
    workers = list(engine.executor._ranks.procs.values())  # noqa: SLF001 - the test kills a real rank process
    assert len(workers) == 1 and workers[0].is_alive()
    return int(workers[0].pid)


@pytest.mark.slow
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-request"])
def test_killed_rank_fails_the_engine_naming_the_rank(busy: bool, llama_ckpt, make_tp_engine: MakeTPEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_tp_engine(llama_ckpt, 2)
    pid = _worker_pid(engine)
    if busy:
        engine.add_request("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
        engine.step()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + DEATH_GUARD_S
    with pytest.raises(EngineError) as err:
        while time.monotonic() < deadline:
            engine.step()
            time.sleep(0.1)
    assert "TP rank 1" in str(err.value) and str(pid) in str(err.value)
    engine.shutdown()  # reaps what is left; must not hang on the dead peer
