"""An engine whose construction fails after its executor started (the connector, its KV registration, the offload
tier, ...) shuts that executor down before the error goes on: its TP ranks and the runner's memory do not outlive
the failed build (a TP group's workers stayed alive until the process exited), and a connector already made is
shut down too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdlaunch.engine import llm_engine
from pdlaunch.engine.llm import build_config
from pdlaunch.engine.llm_engine import LLMEngine


class _Connector:
    def __init__(self) -> None:
        self.shut = 0

    def register_kv_caches(self, spec: Any) -> None:
        raise RuntimeError("registering the KV caches failed")

    def shutdown(self) -> None:
        self.shut += 1


def test_a_build_failing_after_the_executor_shuts_it_and_the_connector_down(
        llama_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutdowns: list[str] = []
    real = llm_engine.create_executor

    def spied(*args: Any, **kwargs: Any) -> Any:
        executor = real(*args, **kwargs)
        own = executor.shutdown

        def shutdown() -> None:
            shutdowns.append("executor")
            own()

        executor.shutdown = shutdown
        return executor

    monkeypatch.setattr(llm_engine, "create_executor", spied)
    connector = _Connector()
    config = build_config(str(llama_ckpt), "cpu", "float32", {"block_size": 8, "num_gpu_blocks": 64})
    with pytest.raises(RuntimeError, match="registering the KV caches failed"):
        LLMEngine(config, None, connector)  # type: ignore[arg-type]
    assert shutdowns == ["executor"] and connector.shut == 1
