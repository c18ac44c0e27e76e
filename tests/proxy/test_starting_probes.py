"""The proxy probes an instance it has not yet seen ready five times a second, a ready one once a second: the
launcher announces the deployment ready once the proxy sees every instance ready, and the last one's readiness
should not wait up to a second for the next probe."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from pdlaunch.proxy import instances
from pdlaunch.proxy.instances import Instance, InstancePool

WAIT_S = 60.0  # generous: a loaded 2-core host


async def _until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_an_instance_not_yet_ready_is_probed_more_often_than_a_ready_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instances, "HEALTH_INTERVAL_S", 3600.0)
    monkeypatch.setattr(instances, "STARTING_INTERVAL_S", 0.01)
    probes: Counter[str] = Counter()
    loaded: set[str] = {"decode-0"}

    def answer(request: httpx.Request) -> httpx.Response:
        name = {"10.0.0.1": "decode-0", "10.0.0.2": "decode-1", "10.0.0.3": "decode-2"}[request.url.host]
        probes[name] += 1
        if name == "decode-2" or name in loaded:
            return httpx.Response(503, json={"status": "loading"})
        return httpx.Response(200, json={"status": "ok", "role": "decode"})

    pool = InstancePool([Instance(role="decode", url=f"http://10.0.0.{n}:8000", name=f"decode-{n - 1}")
                         for n in (1, 2, 3)], "round_robin")

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            pool.start_monitor(client)
            try:
                await _until(lambda: probes["decode-0"] >= 5, "decode-0 (loading) to be probed 5 times")
                assert [i.state for i in pool.instances] == ["starting", "ready", "starting"]
                assert probes["decode-1"] == 1  # ready at its first probe: the next one comes a second later
                loaded.clear()
                await _until(lambda: pool.instances[0].state == "ready", "decode-0 to be seen ready")
                seen = probes["decode-0"]
                await _until(lambda: probes["decode-2"] >= probes["decode-0"] + 10, "10 more probes of decode-2")
                assert probes["decode-0"] == seen  # ready now: probed once a second like decode-1
            finally:
                await pool.stop_monitor()

    asyncio.run(run())
