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


class _LateOnce(BaseHTTPRequestHandler):
    """/health 200, the first answer 2.5 s late (a GC pause, a starved CPU), every later one at once."""

    protocol_version = "HTTP/1.1"
    late = [2.5]

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.late:
            time.sleep(self.late.pop())
        data = json.dumps({"status": "ok"}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the probe timed out and closed its end


@pytest.fixture()
def late_once() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LateOnce)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/health"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.xfail(strict=True, reason="revlaunch 2: one late /health answer reads as a stall long enough to kill "
                   "for stall_restart_seconds up to ~health_timeout + 1 s")
def test_one_late_health_answer_is_not_a_stall_worth_a_kill(late_once: str) -> None:
    stall_restart_s = 2.5  # what Supervisor._check_stall compares stalled_for with; health_timeout_seconds: 2
    watch = StallWatch({"decode-0": late_once}, timeout_s=2.0)
    watch.watch("decode-0", True)
    watch.start()
    try:
        worst = 0.0
        deadline = time.monotonic() + 8.0  # the late answer, then several prompt ones
        while time.monotonic() < deadline:
            worst = max(worst, watch.stalled_for("decode-0") or 0.0)
            time.sleep(0.05)  # the supervisor's tick looks about this often (SUPERVISE_POLL_S 0.2)
        assert worst < stall_restart_s, (f"one late answer read as stalled for {worst:.1f}s: a supervisor with "
                                         f"stall_restart_seconds {stall_restart_s} kills the healthy instance")
    finally:
        watch.stop()
