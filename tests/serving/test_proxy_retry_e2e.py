"""`pdlaunch serve` with 2 prefill instances: SIGKILL one under a steady stream of requests; every request
sent after the kill succeeds (the proxy retries a refused leg on the other prefill at once, before its
health check has noticed), and the killed prefill is restarted."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.serving.e2e import Serve
from tests.serving.helpers import steady_load, wait_for


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    deployment = Serve(tmp_path_factory.mktemp("retry"), [
        "--model", "tiny", "--prefill", "2", "--decode", "1", "--num-gpu-blocks", "256"])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


@pytest.mark.slow
def test_requests_after_a_prefill_kill_all_succeed(serve: Serve) -> None:
    with steady_load(serve.url) as results:
        wait_for(lambda: len(results) >= 4, "a few requests before the kill", 60)
        pid = serve.instance_pid("prefill-0")
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len([s for s in results if s[0] > killed_at]) >= 8, "requests after the kill", 120)
    after = [status for started, status, _ in results if started > killed_at]
    assert after and all(status == 200 for status in after), after
    wait_for(lambda: {i["name"]: i["state"] for i in httpx.get(f"{serve.url}/instances", timeout=5).json()}
             ["prefill-0"] == "ready", "the killed prefill to be restarted and ready again", 240, poll=0.5)
