"""/health and request admission follow the engine's sleep state after a /sleep or /wake_up that failed or whose
engine call outlived the route's timeout (a 503): the state is the engine's once its call ends, with no GET
/is_sleeping needed to refresh it; a request admitted while the sleep was still running gets the 503 of a sleeping
instance, not a 400; vllm:engine_sleep_state on /metrics says the same (tiny model on CPU, in process, sleep mode
on)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.errors import EngineError
from pdlaunch.http.auth import internal_headers
from pdlaunch.server import sleep as sleep_routes
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import in_process_instance, tiny_colocated, wait_for

SECRET = tiny_colocated(256).security.deployment_secret
CALL_TIMEOUT_S = 3.0  # the routes' wait here: long enough for an idle engine thread to start the call


@pytest.fixture(scope="module")
def instance() -> Iterator[tuple[str, EngineLoop]]:
    cfg = tiny_colocated(256)
    cfg = DeploymentConfig.model_validate({**cfg.model_dump(), "model": {**cfg.model.model_dump(),
                                                                         "enable_sleep_mode": True}})
    with in_process_instance(cfg, "test-sleep-state-0") as served:
        yield served


def control(url: str, path: str) -> httpx.Response:
    """POST /sleep or /wake_up as the deployment's own processes may (control routes need the internal token)."""
    return httpx.post(f"{url}{path}", headers=internal_headers(SECRET), timeout=60)


def sleep_state(url: str) -> dict[str, float]:
    """vllm:engine_sleep_state by sleep_state on the instance's /metrics (model "tiny")."""
    found = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "vllm:engine_sleep_state" and sample.labels["model_name"] == "tiny":
                found[sample.labels["sleep_state"]] = sample.value
    return found


AWAKE = {"awake": 1.0, "weights_offloaded": 0.0, "discard_all": 0.0}
ASLEEP_AT_1 = {"awake": 0.0, "weights_offloaded": 1.0, "discard_all": 0.0}


def health(url: str) -> str:
    return str(httpx.get(f"{url}/health", timeout=30).json()["status"])


def completion(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=120,
                      json={"model": "tiny", "prompt": "Hello", "max_tokens": 2, "temperature": 0.0})


class Gate:
    """Holds an engine method on the engine thread until released, so the route's wait for it times out."""

    def __init__(self, engine: LLMEngine, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        original: Callable[..., Any] = getattr(engine, name)

        def held(*args: Any) -> Any:
            self.entered.set()
            assert self.release.wait(120), "the test never released the engine call"
            return original(*args)

        monkeypatch.setattr(engine, name, held)


def test_state_follows_a_timed_out_sleep_and_wake_up(instance: tuple[str, EngineLoop],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url, loop = instance
    monkeypatch.setattr(sleep_routes, "SLEEP_CALL_TIMEOUT_S", CALL_TIMEOUT_S)
    gate = Gate(loop.engine, "sleep", monkeypatch)
    timed_out = control(url, "/sleep")
    assert timed_out.status_code == 503 and "still runs there" in timed_out.json()["error"]["message"]
    assert gate.entered.is_set() and health(url) == "ok"  # not asleep yet: still serving is right
    with ThreadPoolExecutor(1) as pool:  # admitted now, queued behind the sleep on the engine thread
        queued = pool.submit(completion, url)
        wait_for(lambda: loop.num_pending == 1, "the completion to be queued behind the sleep")
        gate.release.set()
        behind = queued.result(timeout=120)
    # The instance's state is why it was refused, not the request: a 503 a proxy retries elsewhere, never a 400.
    assert behind.status_code == 503 and behind.json()["error"]["code"] == "sleeping", behind.text
    wait_for(lambda: health(url) == "sleeping", "/health to say sleeping once the timed-out sleep ended")
    refused = completion(url)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "sleeping"

    gate = Gate(loop.engine, "wake_up", monkeypatch)
    assert control(url, "/wake_up").status_code == 503
    assert gate.entered.is_set() and health(url) == "sleeping"
    gate.release.set()
    wait_for(lambda: health(url) == "ok", "/health to say ok once the timed-out wake_up ended")
    assert completion(url).status_code == 200


def test_state_follows_a_sleep_that_failed_after_the_memory_went(instance: tuple[str, EngineLoop],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    url, loop = instance
    engine = loop.engine
    sleep, wake_up = engine.sleep, engine.wake_up

    def sleep_then_fail(level: int) -> None:
        sleep(level)
        raise EngineError("injected failure after the sleep", field="sleep")

    def wake_weights_then_fail(tags: list[str] | None) -> None:
        wake_up(["weights"])
        raise EngineError("injected failure after waking the weights", field="tags")

    assert sleep_state(url) == AWAKE
    monkeypatch.setattr(engine, "sleep", sleep_then_fail)
    failed = control(url, "/sleep")
    assert failed.status_code == 400 and failed.json()["error"]["code"] == "sleep_failed"
    assert health(url) == "sleeping" and completion(url).status_code == 503  # the engine is asleep
    assert sleep_state(url) == ASLEEP_AT_1

    monkeypatch.setattr(engine, "wake_up", wake_weights_then_fail)
    assert control(url, "/wake_up").status_code == 400
    assert health(url) == "sleeping" and sleep_state(url) == ASLEEP_AT_1  # the KV cache still is
    monkeypatch.setattr(engine, "wake_up", wake_up)
    woke = control(url, "/wake_up")
    assert woke.status_code == 200 and woke.json()["is_sleeping"] is False
    assert health(url) == "ok" and completion(url).status_code == 200
    assert sleep_state(url) == AWAKE


def test_an_is_sleeping_answered_before_a_sleep_leaves_the_state_asleep(instance: tuple[str, EngineLoop],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /is_sleeping's engine call ran before a /sleep, and its route resumed only after that sleep ended (a
    busy event loop): the instance stays asleep for /health and admission, not awake as the older answer said."""
    url, _ = instance
    on_engine = sleep_routes._on_engine
    answered, slept = threading.Event(), threading.Event()

    async def resumed_after_the_sleep(inst: Any, fn: Callable[[Any], Any], what: str) -> Any:
        result = await on_engine(inst, fn, what)
        if what == "is_sleeping":
            answered.set()
            assert await asyncio.to_thread(slept.wait, 60), "the test never let the /is_sleeping route go on"
        return result

    monkeypatch.setattr(sleep_routes, "_on_engine", resumed_after_the_sleep)
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(lambda: httpx.get(f"{url}/is_sleeping", headers=internal_headers(SECRET), timeout=60))
        assert answered.wait(60), "the /is_sleeping engine call did not end"
        assert control(url, "/sleep").status_code == 200
        slept.set()
        assert asked.result(timeout=60).json() == {"is_sleeping": False}  # true when the engine answered it
    try:
        assert health(url) == "sleeping"
        refused = completion(url)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "sleeping"
    finally:
        assert control(url, "/wake_up").status_code == 200
    assert health(url) == "ok"
