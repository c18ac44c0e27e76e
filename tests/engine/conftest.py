"""Engine fixtures: `make_engine` builds engines whose integrity is checked after every test."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pdlaunch.config.deployment_config import InstanceSpec
from pdlaunch.engine.llm import build_config
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.kv_transfer.base import KVConnector
from tests.kv_transfer.deployment_secret import secured

MakeEngine = Callable[..., LLMEngine]
_request_ids = itertools.count()


@pytest.fixture
def make_engine() -> Iterator[MakeEngine]:
    """make_engine(path, device=None (cpu, or the instance's), instance=None, connector=None, **config overrides)."""
    engines: list[LLMEngine] = []

    def make(path: Path | str, device: str | None = None, dtype: str = "float32", instance: InstanceSpec | None = None,
             connector: KVConnector | None = None, **overrides: Any) -> LLMEngine:
        overrides.setdefault("block_size", 8)
        overrides.setdefault("num_gpu_blocks", 256)
        # The engine runs on its instance's device: a device asked for here goes to the instance too (its
        # default, "cpu", turned a device="cuda" test into a CPU one, silently); else the instance's is used.
        if instance is not None and device is not None:
            instance = instance.model_copy(update={"device": device})
        device = device or (instance.device if instance is not None else "cpu")
        engine = LLMEngine(secured(build_config(str(path), device, dtype, overrides)), instance, connector)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.check_integrity()
        if not engine.has_unfinished_requests() and not engine.scheduler.held:
            assert engine.block_manager.num_used_blocks() == 0, "finished engine still holds KV blocks"
        engine.shutdown()


def run_all(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
            check_every_step: bool = True) -> list[RequestOutput]:
    """Add every prompt, step to completion; the final output of each, in prompt order."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    ids = [f"req-{next(_request_ids)}" for _ in prompts]
    for rid, prompt, p in zip(ids, prompts, plist):
        engine.add_request(rid, prompt, p)
    final: dict[str, RequestOutput] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        if check_every_step:
            engine.check_integrity()
        steps += 1
        assert steps < 10_000, "engine made no progress"
    return [final[rid] for rid in ids]
