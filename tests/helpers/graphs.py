"""Helpers of the CUDA-graph tests: force a graph path on for engines built on CPU and record its steps; count
graph replays on CUDA."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from pdlaunch.distributed import executor as executor_module
from pdlaunch.runner.model_runner import ModelRunner


class GraphRuns(list):  # type: ignore[type-arg]
    """(rows, ladder size) of every step that ran a padded graph path; `force` turns that path on for engines
    built from then on."""

    force: bool | None = True


def record_graph_runs(monkeypatch: pytest.MonkeyPatch, graphs_class: Any, runner_flag: str,
                      rows: Callable[[Any], Any], also: dict[str, Any] | None = None) -> GraphRuns:
    """Record every `graphs_class.run(inputs, size, ...)` as (rows(inputs), size), and build every engine's
    ModelRunner with `runner_flag` (e.g. "decode_graphs") set to `runs.force`, and the runner flags in `also`
    while it is True; `runs.force = None` records without changing how engines are built."""
    runs = GraphRuns()
    real_run = graphs_class.run

    def run(self: Any, inputs: Any, size: int, *rest: Any) -> Any:
        runs.append((rows(inputs), size))
        return real_run(self, inputs, size, *rest)

    monkeypatch.setattr(graphs_class, "run", run)
    monkeypatch.setattr(executor_module, "ModelRunner",
                        lambda *a, **k: ModelRunner(*a, **k) if runs.force is None else
                        ModelRunner(*a, **{**k, runner_flag: runs.force, **((also or {}) if runs.force else {})}))
    return runs


@contextmanager
def counting_replays() -> Iterator[list[int]]:
    """Counts every CUDAGraph.replay inside the block: `with counting_replays() as n: ...; n[0]`."""
    count = [0]
    real_replay = torch.cuda.CUDAGraph.replay

    def replay(self: torch.cuda.CUDAGraph) -> None:
        count[0] += 1
        real_replay(self)

    torch.cuda.CUDAGraph.replay = replay  # type: ignore[method-assign]
    try:
        yield count
    finally:
        torch.cuda.CUDAGraph.replay = real_replay  # type: ignore[method-assign]
