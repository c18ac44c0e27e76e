"""supervision.drain_timeout_seconds through the user's path: `pdlaunch serve --drain-timeout-seconds S`, requests
in flight, SIGTERM. The launcher says the drain it waits, and a non-streaming request still running when the drain
ends gets a 503 JSON error with code shutting_down and Retry-After (it got a bare `500 Internal Server Error` text
and proxy.log a traceback), a stream its shutting_down event; no traceback in proxy.log."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serving.e2e import Serve, wait_gone
from tests.serving.helpers import wait_for

DRAIN_S = 3


@pytest.mark.e2e
def test_sigterm_answers_requests_the_drain_cuts_with_503_shutting_down(tmp_path: Path) -> None:
    serve = Serve(tmp_path, ["--model", "tiny", "--prefill", "1", "--decode", "1", "--num-gpu-blocks", "1024",
                             "--block-size", "8", "--drain-timeout-seconds", str(DRAIN_S)])
    try:
        serve.wait_ready()
        events: list[str] = []
        streaming = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{serve.url}/v1/completions", timeout=120, json={
                    "model": "tiny", "prompt": "stream a while", "max_tokens": 1900, "ignore_eos": True,
                    "stream": True}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        streaming.set()

        def whole(i: int) -> httpx.Response:
            return httpx.post(f"{serve.url}/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": f"answer {i} at length", "max_tokens": 1900, "ignore_eos": True})

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(whole, i) for i in range(4)]
            assert streaming.wait(120), "no streamed token within 120s"
            decode = serve.instance_urls()["decode-0"]
            wait_for(lambda: _running(decode) >= 5, "the stream and the four requests to run on the decode", 120)
            children = list(serve.children)
            sent = time.monotonic()
            serve.proc.send_signal(signal.SIGTERM)
            answers = [f.result(120) for f in futures]
        waited = time.monotonic() - sent
        reader.join(60)
        assert serve.proc.wait(60) == 0, serve.output
        wait_gone(children)
    finally:
        serve.stop()
    assert f"draining in-flight requests (up to {DRAIN_S}s)" in serve.output, serve.output
    for r in answers:
        assert r.status_code == 503, (r.status_code, r.text[:300])
        assert r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"] == "1", (r.text, r.headers)
    assert DRAIN_S - 1.5 < waited < DRAIN_S + 5, waited  # at the configured drain's end
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down", events[-3:]
    proxy_log = (serve.log_dir / "proxy.log").read_text(errors="replace")
    assert "Traceback" not in proxy_log and "graceful shutdown exceeded" not in proxy_log, proxy_log[-3000:]



def _running(decode_url: str) -> float:
    """The decode's pdlaunch_requests_running (its /metrics needs no credential: the deployment has no API key)."""
    for line in httpx.get(decode_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("pdlaunch_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
