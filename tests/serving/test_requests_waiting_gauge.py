"""pdlaunch_requests_waiting counts what vllm:num_requests_waiting counts: a request whose KV load failed and that
waits to compute its prompt once its old blocks are safe to free (scheduler.recomputing) is waiting. The engine
loop set the gauge again after every step from the engine's stats, which leave that queue out, so the two series
disagreed while such a request waited (tiny model on CPU, in process)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from pdlaunch.metrics.vllm_series import NUM_REQUESTS_WAITING, vllm
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import in_process_instance, tiny_colocated, wait_for, waiting_to_recompute


@pytest.fixture(scope="module")
def instance() -> Iterator[tuple[str, EngineLoop]]:
    with in_process_instance(tiny_colocated(256), "test-waiting-gauge-0") as served:
        yield served


def _gauges(url: str) -> dict[str, float]:
    """The two gauges of this instance: vLLM's series of its model_name (the registry is the process's, and an
    instance run in this worker before may have left its own series under another model_name)."""
    ours = f'model_name="{vllm(NUM_REQUESTS_WAITING)._labelvalues[0]}"'
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("pdlaunch_requests_waiting") or (name.startswith("vllm:num_requests_waiting{")
                                                              and ours in name):
            values[name.partition("{")[0]] = float(value)
    return values


def test_a_request_waiting_to_recompute_counts_as_waiting(instance: tuple[str, EngineLoop]) -> None:
    url, loop = instance
    both = {"pdlaunch_requests_waiting": 1.0, "vllm:num_requests_waiting": 1.0}
    with waiting_to_recompute(loop, "waits-to-recompute"):
        # Steps run every few ms while a request waits: sample until the gauges were read after several.
        for _ in range(20):
            wait_for(lambda: _gauges(url).get("vllm:num_requests_waiting") == 1.0, "the engine to count it", 30)
            assert _gauges(url) == both
    wait_for(lambda: _gauges(url) == {k: 0.0 for k in both}, "the gauges to drop back to 0", 30)
