"""The proxy's 503 `no_instance` says in Retry-After when the role's instance should be ready again, from what the
deployment does: the launcher restarts a dead instance after supervision.restart_backoff_seconds (--restart-backoff)
and the instance then loads. Once the proxy has seen an instance restart (ready again under a new engine_id), it
expects the next outage to last as long, less the time already out; before that, the backoff plus a few seconds of
load. An instance that is asleep comes back only when someone wakes it: no Retry-After then."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from pdlaunch.http.errors import error_body
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.__main__ import parse_args
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.unready import NO_INSTANCE_LOAD_S, NO_INSTANCE_MAX_S, OVERDUE_RETRY_AFTER_S
from tests.serving.helpers import ThreadServer, wait_for


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Health:
    """What the fake instance's /health answers: ready under `engine_id`, or not ready in `state`."""

    state: str = "ok"
    engine_id: str = "colocated-0-e"


def instance_app(health: Health) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def get_health() -> Any:
        while health.state == "stalled":  # alive but not answering (SIGSTOP): the proxy's probe times out
            await asyncio.sleep(0.05)
        if health.state == "ok":
            return {"status": "ok", "role": "colocated", "engine_id": health.engine_id}
        body = error_body(503, f"instance is {health.state}", code=health.state)
        body["status"] = health.state
        return JSONResponse(body, status_code=503)

    return app


Setup = tuple[str, InstancePool, Health, FakeClock]


@pytest.fixture()
def setup() -> Iterator[Setup]:
    ports = PortAllocator("127.0.0.1")
    health, clock = Health(), FakeClock()
    with ThreadServer(instance_app(health), ports.free("instance")) as inst:
        pool = InstancePool([Instance("colocated", inst.url, "colocated-0", planned_engine_id="colocated-0-e")],
                            restart_backoff_s=10.0, clock=clock)
        with ThreadServer(build_proxy_app(pool, request_timeout_s=30.0), ports.free("proxy")) as proxy:
            wait_for(lambda: pool.instances[0].state == "ready", "colocated-0 ready at the proxy")
            yield proxy.url, pool, health, clock


def _set(setup: Setup, state: str, engine_id: str = "colocated-0-e") -> None:
    """The instance's /health says `state` from now on; returns once the proxy's probe has seen it."""
    _, pool, health, _ = setup
    health.state, health.engine_id = state, engine_id
    instance = pool.instances[0]
    if state == "ok":
        wait_for(lambda: instance.state == "ready" and instance.engine_id == engine_id
                 and instance.outage.since is None, f"colocated-0 ready as {engine_id} at the proxy")
    elif state == "stalled":
        wait_for(lambda: instance.state == "stalled", "colocated-0 stalled at the proxy")
    else:  # the outage's start recorded too: the clock may move on
        wait_for(lambda: instance.state == "unhealthy" and instance.health_state == state
                 and instance.outage.since is not None, f"colocated-0 {state} at the proxy")


def _refused(url: str, stream: bool = False) -> httpx.Response:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": stream}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_instance", r.text
    return r


@pytest.mark.parametrize("stream", [False, True])
def test_before_any_restart_the_wait_is_the_backoff_and_a_load(setup: Setup, stream: bool) -> None:
    url, _, _, clock = setup
    _set(setup, "loading")
    assert _refused(url, stream).headers["retry-after"] == str(int(10.0 + NO_INSTANCE_LOAD_S))
    clock.now += 6
    assert _refused(url, stream).headers["retry-after"] == str(int(10.0 + NO_INSTANCE_LOAD_S - 6))


def test_after_a_restart_the_wait_is_what_that_restart_took_less_the_time_out(setup: Setup) -> None:
    url, _, _, clock = setup
    _set(setup, "loading")
    clock.now += 23  # the launcher's backoff and the load
    _set(setup, "ok", "colocated-0-e-r1")
    clock.now += 100
    _set(setup, "loading")
    assert _refused(url).headers["retry-after"] == "23"
    clock.now += 8
    assert _refused(url).headers["retry-after"] == "15"
    clock.now += 30  # past what the last restart took: another few seconds, not 1 (the client's retries are few)
    assert _refused(url).headers["retry-after"] == str(int(OVERDUE_RETRY_AFTER_S))


def test_an_outage_that_was_no_restart_does_not_shorten_the_wait(setup: Setup) -> None:
    """Unhealthy for a second and back under the same engine_id (a probe that failed): no restart to learn from."""
    url, _, _, clock = setup
    _set(setup, "loading")
    clock.now += 1
    _set(setup, "ok")
    _set(setup, "loading")
    assert _refused(url).headers["retry-after"] == str(int(10.0 + NO_INSTANCE_LOAD_S))


def test_the_wait_is_bounded(setup: Setup) -> None:
    url, _, _, clock = setup
    _set(setup, "loading")
    clock.now += 3600
    _set(setup, "ok", "colocated-0-e-r1")
    _set(setup, "loading")
    assert _refused(url).headers["retry-after"] == str(NO_INSTANCE_MAX_S)


def test_a_sleeping_instance_is_no_wait_that_ends(setup: Setup) -> None:
    url, _, _, _ = setup
    _set(setup, "sleeping")
    r = _refused(url)
    assert "retry-after" not in r.headers
    assert "POST /wake_up" in r.json()["error"]["message"], r.text


def test_the_flag_carries_the_launchers_backoff(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--colocated", "http://127.0.0.1:1", "--restart-backoff", "2.5"])
    assert args.restart_backoff == 2.5
    with pytest.raises(SystemExit) as exited:
        parse_args(["--colocated", "http://127.0.0.1:1", "--restart-backoff", "0"])
    assert exited.value.code == 1
    assert "--restart-backoff must be a positive number of seconds" in capsys.readouterr().err


def test_the_launcher_passes_the_deployments_backoff() -> None:
    from pdlaunch.config.deployment_config import DeploymentConfig
    from pdlaunch.launcher.child_commands import proxy_argv

    cfg = DeploymentConfig.model_validate({"model": {"path": "tiny"}, "supervision": {"restart_backoff_seconds": 7}})
    argv = proxy_argv(cfg, "127.0.0.1", 8000, 5.0, [("colocated", "colocated-0", "http://127.0.0.1:1")])
    assert argv[argv.index("--restart-backoff") + 1] == "7.0"


def test_the_last_second_before_the_expected_return_is_a_wait_of_one_second(setup: Setup) -> None:
    """Less than a second before the instance should be back (as long as its last restart took), the answer said
    Retry-After: 5, the wait of an overdue outage, though the instance was not overdue: a client waited up to 4 s
    past its return."""
    url, _, _, clock = setup
    _set(setup, "loading")
    clock.now += 23
    _set(setup, "ok", "colocated-0-e-r1")
    clock.now += 100
    _set(setup, "loading")
    clock.now += 22.5  # 0.5 s left of the 23 s the last restart took
    assert _refused(url).headers["retry-after"] == "1"
    clock.now += 0.5  # due now, and then past it: overdue
    assert _refused(url).headers["retry-after"] == str(int(OVERDUE_RETRY_AFTER_S))


def test_a_stall_before_a_restart_is_not_counted_as_the_restarts_time(setup: Setup) -> None:
    """A stalled instance (alive, /health silent) is restarted only when supervision.stall_restart_seconds kills
    it; the restart takes as long from then as after a crash. The time it sat stalled was counted in, and the next
    outage's Retry-After said the stall and the restart together (here 50 s for a 20 s restart)."""
    url, _, _, clock = setup
    _set(setup, "stalled")
    clock.now += 30  # until the launcher kills it
    _set(setup, "loading")  # killed, restarted, loading
    clock.now += 20
    _set(setup, "ok", "colocated-0-e-r1")
    clock.now += 100
    _set(setup, "loading")
    assert _refused(url).headers["retry-after"] == "20"
