"""Rank 0 under --backend ray (ray_executor.py) when a rank misses a call: the failure is the instance's
(its next health check fails, as with local ranks), and a collective that timed out names the rank whose
step never finished. Fast: a stand-in for the ray module, Ray's own exception classes."""

from __future__ import annotations

import threading
import types

import pytest

from pdlaunch.distributed import ray_executor
from pdlaunch.distributed.messages import GetFinished
from pdlaunch.errors import EngineError

ray = pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")


class StuckRank(types.ModuleType):
    """The ray module with rank 1 never finishing a call: every ref stays pending."""

    exceptions = ray.exceptions

    def __init__(self) -> None:
        super().__init__("ray")

    def put(self, value: object) -> object:
        return value

    def wait(self, refs: list[str], num_returns: int = 1, timeout: float | None = None
             ) -> tuple[list[str], list[str]]:
        return [], list(refs)

    def get(self, refs: object, timeout: float | None = None) -> object:
        raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready.")


class RankActor:
    """A rank actor handle: each call's ref is "<method>-1"."""

    def __init__(self) -> None:
        for method in ("execute", "connector_call"):
            setattr(self, method, types.SimpleNamespace(remote=lambda *a, m=method: f"{m}-1"))


class CollectiveTimesOut:
    def run(self, inputs: object) -> None:
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Timed out waiting 60000ms for recv operation")


def rank0() -> ray_executor.RayTPExecutor:
    executor = ray_executor.RayTPExecutor.__new__(ray_executor.RayTPExecutor)
    executor._ray, executor._actors = StuckRank(), [RankActor()]  # type: ignore[list-item]  # noqa: SLF001
    executor._nodes, executor._pending = ["10.0.0.1", "10.0.0.2"], {}  # noqa: SLF001
    executor.failure, executor._closing = None, threading.Event()  # noqa: SLF001
    executor.runner = CollectiveTimesOut()  # type: ignore[assignment]
    return executor


def test_a_rank_that_does_not_answer_a_mirrored_call_fails_the_instance() -> None:
    executor = rank0()
    with pytest.raises(EngineError, match=r"TP rank 1 \(Ray actor on 10.0.0.2\) did not answer GetFinished"):
        executor._mirror(GetFinished())  # noqa: SLF001
    with pytest.raises(EngineError, match="did not answer GetFinished"):
        executor.check_health()


def test_a_collective_that_timed_out_names_the_rank_whose_step_never_finished(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_executor, "DEATH_REPORT_WAIT_S", 0.1)
    executor = rank0()
    with pytest.raises(EngineError) as err:
        executor.execute("step")  # type: ignore[arg-type]  # the stand-in runner takes anything
    assert "Timed out waiting 60000ms" in err.value.message
    assert err.value.message.endswith("(TP rank 1 (Ray actor on 10.0.0.2) still in its step: hung or stopped)")
    with pytest.raises(EngineError, match="still in its step"):
        executor.check_health()
