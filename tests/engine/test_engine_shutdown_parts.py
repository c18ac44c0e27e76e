"""LLMEngine.shutdown releases each part even when an earlier one fails: an offload tier whose shutdown raises
(its transfer thread stuck past the timeout) must not leave the connector's agent or the executor's TP ranks and
device memory behind. The first failure is raised after every part ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.errors import EngineError
from tests.engine.conftest import MakeEngine


def test_a_failing_offload_shutdown_still_shuts_the_executor_down(hybrid_ckpt: Path, make_engine: MakeEngine,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(hybrid_ckpt, block_size=4, num_gpu_blocks=12, kv_offload_gb=0.001)
    assert engine.offload is not None
    done: list[str] = []
    real_executor_shutdown = engine.executor.shutdown

    def offload_shutdown() -> None:
        done.append("offload")
        raise EngineError("KV offload job 3 did not complete within 60s", field="offload")

    def executor_shutdown() -> None:
        done.append("executor")
        real_executor_shutdown()

    monkeypatch.setattr(engine.offload, "shutdown", offload_shutdown)
    monkeypatch.setattr(engine.executor, "shutdown", executor_shutdown)
    with pytest.raises(EngineError, match="did not complete"):
        engine.shutdown()
    assert done == ["offload", "executor"]
    engine.shutdown()  # idempotent: nothing runs twice
    assert done == ["offload", "executor"]
