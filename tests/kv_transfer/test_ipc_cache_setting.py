"""UCX_CUDA_IPC_CACHE is "n" when a NIXL agent's UCX context starts on a host with CUDA, unless the user set it
(kv_transfer/agent.py says why: with UCX's mapping cache on, a dead peer's GPU memory stays allocated while this
process lives). Without CUDA it stays unset: UCX would warn at every start that the variable is unused."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest

from pdlaunch.kv_transfer import agent as agent_module
from pdlaunch.kv_transfer.agent import IPC_CACHE_ENV, KVAgent


@pytest.fixture()
def seen(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The variable's value at each moment a nixl agent is built (UCX reads it then); the log line unsaid."""
    values: list[str | None] = []
    build = agent_module._create_agent

    def spy(api: Any, name: str, config: Any) -> Any:
        values.append(os.environ.get(IPC_CACHE_ENV))
        return build(api, name, config)

    monkeypatch.setattr(agent_module, "_create_agent", spy)
    monkeypatch.setattr(agent_module, "_ipc_cache_said", [])
    return values


def test_an_agent_starts_with_the_ipc_cache_off(monkeypatch: pytest.MonkeyPatch, seen: list[str | None],
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(IPC_CACHE_ENV, raising=False)
    monkeypatch.setattr(agent_module, "cuda_available", lambda: True)
    with caplog.at_level(logging.INFO, logger=agent_module.__name__):
        first, second = KVAgent("ipc-cache-a"), KVAgent("ipc-cache-b")
    first.close()
    second.close()
    assert seen == ["n", "n"]
    said = [r.getMessage() for r in caplog.records if IPC_CACHE_ENV in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{IPC_CACHE_ENV}=n:") and f"{IPC_CACHE_ENV}=y" in said[0], said


def test_the_users_setting_wins(monkeypatch: pytest.MonkeyPatch, seen: list[str | None],
                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(IPC_CACHE_ENV, "y")
    with caplog.at_level(logging.INFO, logger=agent_module.__name__):
        KVAgent("ipc-cache-user").close()
    assert seen == ["y"] and os.environ[IPC_CACHE_ENV] == "y"
    assert any(f"{IPC_CACHE_ENV}=y, as set in the environment" in r.getMessage() for r in caplog.records)


def test_without_cuda_the_variable_stays_unset(monkeypatch: pytest.MonkeyPatch, seen: list[str | None],
                                               capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(IPC_CACHE_ENV, raising=False)
    monkeypatch.setattr(agent_module, "cuda_available", lambda: False)
    KVAgent("ipc-cache-cpu").close()
    assert seen == [None] and IPC_CACHE_ENV not in os.environ
    assert IPC_CACHE_ENV not in capfd.readouterr().out  # UCX says nothing of an unused variable
