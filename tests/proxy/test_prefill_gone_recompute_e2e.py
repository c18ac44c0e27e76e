"""`pdlaunch serve` 1 prefill + 1 decode (tiny, CPU): SIGKILL the prefill under a steady stream of requests. With no
other prefill, every request sent after the kill is answered by the decode alone (kv_transfer.load_failure_policy
recompute, the default: prefill_leg.py), counted in pdlaunch_proxy_legs_retried{role="prefill",reason="recompute"},
and the restarted prefill takes legs again. Before, each request failed with a 502/503 until the prefill was back.
The same through fake instances, policy fail and each way of being gone: test_prefill_gone_recompute.py."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.serving.e2e import Serve
from tests.serving.helpers import steady_load, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
RECOMPUTED = 'pdlaunch_proxy_legs_retried_total{reason="recompute",role="prefill"}'


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    deployment = Serve(tmp_path_factory.mktemp("prefill-gone"), [
        "--model", "tiny", "--prefill", "1", "--decode", "1", "--num-gpu-blocks", "256"])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


def _state(serve: Serve, name: str) -> str:
    return str({i["name"]: i["state"] for i in httpx.get(f"{serve.url}/instances", timeout=5).json()}[name])


def _recomputed(serve: Serve) -> float:
    lines = [line for line in httpx.get(f"{serve.url}/metrics", timeout=10).text.splitlines()
             if line.startswith(RECOMPUTED + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_requests_while_the_only_prefill_restarts_are_answered_by_the_decode(serve: Serve) -> None:
    with steady_load(serve.url) as results:
        wait_for(lambda: len(results) >= 4, "a few requests before the kill", 60)
        killed_at = time.monotonic()
        os.kill(serve.instance_pid("prefill-0"), signal.SIGKILL)
        wait_for(lambda: _state(serve, "prefill-0") != "ready", "the proxy to see prefill-0 gone", 30)
        wait_for(lambda: len([r for r in results if r[0] > killed_at]) >= 8, "requests after the kill", 120)
        failed = [(status, text) for started, status, text in list(results) if started > killed_at and status != 200]
        assert not failed, failed
        assert _recomputed(serve) >= 1  # while prefill-0 was gone, the decode computed prompts
        wait_for(lambda: _state(serve, "prefill-0") == "ready", "the killed prefill restarted and ready", 240, 0.5)
        after_restart = len(results)
        wait_for(lambda: len(results) >= after_restart + 4, "requests after the restart", 60)
    failed = [(status, text) for started, status, text in results if started > killed_at and status != 200]
    assert not failed, failed
    recomputed = _recomputed(serve)
    r = httpx.post(f"{serve.url}/v1/completions", json={"model": "tiny", "prompt": "after", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200 and _recomputed(serve) == recomputed  # PD again: the prefill took the leg
