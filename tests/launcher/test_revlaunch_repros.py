"""Repros of launcher bugs found by review (h-revlaunch), each marked strict xfail until it is fixed: a fix turns
its test into an XPASS, which fails the run, so the mark comes off with the fix.

1. A stop that does not wait for the proxy's drain (a second Ctrl-C, a child that died with restarts off, a stall
   or restart kill of the proxy) SIGKILLs the proxy's process group before its worker supervisor (proxy.workers > 1,
   the `auto` default on a host with 16+ CPUs) removes its private directory: `$TMPDIR/pdlaunch-proxy-metrics-*`,
   the prometheus multiprocess files and the load board, stays behind, once per such stop or proxy restart; serve
   still says "stopped: all processes reaped".
2. With supervision.stall_restart_seconds at or below about health_timeout_seconds + the probe interval, one late
   /health answer (a healthy instance paused for 2.5 s on a loaded 2-core box) gets the instance SIGKILLed: the
   stall's age starts at the first unanswered probe's send time and keeps growing while the next probe is in flight.
3. TPRanks.stop joins its local workers one after another, each up to JOIN_TIMEOUT_S (10 s): workers that cannot read
   "shutdown" (still loading, or blocked in a collective on a dead peer) make rank 0 take (T-1) x 10 s to stop, 70 s
   for TP 8, before the failed start is reported or the dead instance exits and the launcher can restart it.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from pdlaunch.launcher.stall_watch import StallWatch
from tests.serving.e2e import Serve
from tests.serving.helpers import wait_for

STREAM_TOKENS = 1900  # a stream still running when the stop comes (tiny model on CPU: tens of seconds)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="revlaunch 1: a proxy SIGKILLed by the launcher leaves its metrics dir "
                   "and load board in TMPDIR")
def test_a_hurried_stop_leaves_no_proxy_metrics_dir_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own_tmp = tmp_path / "tmp"
    own_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(own_tmp))  # the launcher's children inherit it; the proxy makes its dir there
    serve = Serve(tmp_path, ["--model", "tiny", "--colocated", "--proxy-workers", "2"])
    try:
        serve.wait_ready()
        assert [p.name for p in own_tmp.glob("pdlaunch-proxy-metrics-*")], "the proxy made no metrics dir"
        streamed = threading.Event()

        def stream() -> None:
            body = {"model": "tiny", "prompt": "hello " * 20, "max_tokens": STREAM_TOKENS, "stream": True}
            try:
                with httpx.stream("POST", f"{serve.url}/v1/completions", json=body, timeout=120) as response:
                    for _ in response.iter_lines():
                        streamed.set()
            except httpx.HTTPError:
                pass  # the hurried stop cuts it

        threading.Thread(target=stream, daemon=True).start()
        wait_for(streamed.is_set, "the stream to begin", 60)
        serve.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining in-flight requests" in serve.output, "serve to begin its drain", 30)
        serve.proc.send_signal(signal.SIGTERM)  # second signal: stop at once
        assert serve.proc.wait(60) == 0, serve.output
        assert "stopped: all processes reaped" in serve.output, serve.output
        left = {p.name: sorted(f.name for f in p.iterdir()) for p in own_tmp.glob("pdlaunch-proxy-metrics-*")}
        assert not left, f"left behind in TMPDIR: {left}"
    finally:
        serve.stop()
