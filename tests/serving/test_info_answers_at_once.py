"""/info answers from what the engine thread last recorded, never by waiting for that thread: while a sleep or wake_up
holds it (up to two minutes), /info used to wait 30 s and answer 503. It says which of the two runs. Its stats count a
request waiting to compute its prompt after a failed KV load as waiting (tiny model on CPU, in process, sleep mode
on)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import in_process_instance, tiny_colocated, wait_for, waiting_to_recompute
from tests.serving.test_sleep_state_http import Gate, control

INFO_TIMEOUT_S = 5.0  # /info reads no engine: it answers in ms, even with the engine thread held


@pytest.fixture(scope="module")
def instance() -> Iterator[tuple[str, EngineLoop]]:
    cfg = tiny_colocated(256)
    cfg = DeploymentConfig.model_validate({**cfg.model_dump(), "model": {**cfg.model.model_dump(),
                                                                         "enable_sleep_mode": True}})
    with in_process_instance(cfg, "test-info-at-once-0") as served:
        yield served


def info(url: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}/info", timeout=INFO_TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_info_answers_while_a_sleep_or_wake_up_holds_the_engine_thread(instance: tuple[str, EngineLoop],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    url, loop = instance
    before = info(url)
    assert (before["state"], before.get("sleep_transition")) == ("ready", None)
    for path, transition, during, after in (("/sleep", "falling_asleep", "ready", "sleeping"),
                                            ("/wake_up", "waking_up", "sleeping", "ready")):
        gate = Gate(loop.engine, path.strip("/"), monkeypatch)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(control, url, path)
            assert gate.entered.wait(60), f"the engine thread to start {path}"
            try:
                held = info(url)
            finally:
                gate.release.set()
            assert answer.result(timeout=120).status_code == 200
        assert (held["state"], held["sleep_transition"]) == (during, transition)
        assert held["rank_engine_ids"] == before["rank_engine_ids"] and held["stats"]["num_blocks_total"] > 0
        assert (info(url)["state"], info(url)["sleep_transition"]) == (after, None)


def test_info_counts_a_request_waiting_to_recompute_as_waiting(instance: tuple[str, EngineLoop]) -> None:
    url, loop = instance
    with waiting_to_recompute(loop, "waits-to-recompute"):
        wait_for(lambda: info(url)["stats"]["num_waiting"] == 1, "/info to count the request waiting to recompute",
                 timeout=10)  # a quiescent engine steps every 0.5 s
        stats = info(url)["stats"]
        assert (stats["num_recomputing"], stats["num_waiting_for_kv"]) == (1, 0)
    wait_for(lambda: info(url)["stats"]["num_waiting"] == 0, "/info to drop it once it is gone")
