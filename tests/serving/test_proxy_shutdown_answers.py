"""What a client whose request is still running gets when the proxy's drain at shutdown runs out: a non-streaming
request a 503 JSON error with code shutting_down and Retry-After (it was a bare `500 Internal Server Error` text,
and proxy.log a traceback: uvicorn cancelled the request's task), a stream its shutting_down event. Through
`python -m pdlaunch.proxy` as the launcher starts it, SIGTERM as the launcher sends it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pdlaunch.launcher.ports import PortAllocator
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_failures import ScriptedInstance

DRAIN_S = 2


def _answer(url: str) -> httpx.Response:
    # "hang": the scripted decode never answers a non-streaming request (test_proxy_failures.ScriptedInstance).
    return httpx.post(url + "/v1/completions", json={"prompt": "hang", "max_tokens": 48}, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_request_cut_by_the_drain_gets_a_503_shutting_down_and_no_traceback(tmp_path: Path, workers: str) -> None:
    ports = PortAllocator("127.0.0.1")
    prefill, decode = ScriptedInstance("prefill"), ScriptedInstance("decode")
    log_path = tmp_path / "proxy.log"
    port = ports.free("proxy")
    url = f"http://127.0.0.1:{port}"
    with ThreadServer(prefill.app, ports.free("prefill")) as p, ThreadServer(decode.app, ports.free("decode")) as d, \
            open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pdlaunch.proxy", "--port", str(port), "--prefill", p.url,
                                 "--decode", d.url, "--drain-timeout", str(DRAIN_S), "--workers", workers],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: _healthy(url), "the proxy to answer /health", 120)
            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(_answer, url) for _ in range(4)]
                wait_for(lambda: len(decode.requests) == 4, "the four requests to reach the decode", 60)
                sent = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                answers = [f.result(60) for f in futures]
            waited = time.monotonic() - sent
            # uvicorn re-raises the SIGTERM it caught once it has shut down; a supervisor of workers exits 0.
            assert proc.wait(60) in (0, -signal.SIGTERM)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = log_path.read_text(errors="replace")
    for r in answers:
        assert r.status_code == 503, (r.status_code, r.text, text[-3000:])
        assert r.json()["error"]["code"] == "shutting_down" and "shutting down" in r.json()["error"]["message"], r.text
        assert r.headers["retry-after"] == "1", r.headers
    assert waited < DRAIN_S + 5, waited  # answered at the drain's end, not by the supervisor's kill
    assert "Traceback" not in text and "graceful shutdown exceeded" not in text, text[-3000:]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
