"""A TP worker that fails while the group starts: the engine's error is that rank's, and a restart works."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.distributed import parallel_state, tp_startup
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import EngineError
from tests.tp.conftest import MakeTPEngine


def _break_the_worker(monkeypatch: pytest.MonkeyPatch, missing: Path) -> None:
    """Rank 1 fails loading `missing`, before it joins the group (rank 0 sees it exit; were it to wait in
    its own join instead, 10 s bounds that)."""
    drawn = tp_startup._as_drawn_by_worker  # noqa: SLF001

    def broken_for_the_worker(config: DeploymentConfig, instance: InstanceSpec | None
                              ) -> tuple[DeploymentConfig, InstanceSpec | None]:
        config, instance = drawn(config, instance)
        config.model.path = str(missing)
        return config, instance

    monkeypatch.setattr(tp_startup, "_as_drawn_by_worker", broken_for_the_worker)
    monkeypatch.setattr(parallel_state, "COLLECTIVE_TIMEOUT_S", 10.0)


@pytest.mark.slow
def test_a_rank_failing_before_it_joins_names_itself_and_its_reason(  # type: ignore[no-untyped-def]
        llama_ckpt, make_tp_engine: MakeTPEngine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _break_the_worker(monkeypatch, tmp_path / "not-a-checkpoint")
    with pytest.raises(EngineError) as err:
        make_tp_engine(llama_ckpt, 2)
    assert "TP rank 1" in str(err.value) and "not-a-checkpoint" in str(err.value), str(err.value)


@pytest.mark.slow
def test_the_engine_restarts_in_the_same_process_after_a_failed_startup(  # type: ignore[no-untyped-def]
        llama_ckpt, make_tp_engine: MakeTPEngine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _break_the_worker(monkeypatch, tmp_path / "not-a-checkpoint")
    with pytest.raises(EngineError):
        make_tp_engine(llama_ckpt, 2)
    monkeypatch.undo()
    monkeypatch.setattr(parallel_state, "COLLECTIVE_TIMEOUT_S", 20.0)  # a broken restart fails sooner
    engine = make_tp_engine(llama_ckpt, 2)
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
