"""`pdlaunch bench compare` under `nohup` (SIGHUP ignored) keeps running when the terminal closes; SIGTERM, and a
SIGHUP that is not ignored, unwind it like Ctrl-C so that its deployments are stopped, but never from inside an
HTTP call: a KeyboardInterrupt raised inside httpcore's connection-pool lock left it held, and the probe's close()
in the `finally` waited on it for good."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rich.console import Console

from pdlaunch.bench.compare import termination_as_interrupt
from pdlaunch.bench.engine_load import InstanceTotals, LoadProbe
from pdlaunch.bench.serve import measure
from pdlaunch.bench.serve_config import ServeBenchConfig
from pdlaunch.launcher.serve import StopRequested, StopSignals


def test_an_ignored_hangup_stays_ignored_and_sigterm_still_interrupts() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"), termination_as_interrupt():
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing raised
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_hangup_interrupts_when_not_ignored() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGHUP"), termination_as_interrupt():
            os.kill(os.getpid(), signal.SIGHUP)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_ctrl_c_is_left_to_python() -> None:
    before = signal.getsignal(signal.SIGINT)
    with termination_as_interrupt():
        assert signal.getsignal(signal.SIGINT) is before


class _SignalledMetrics(BaseHTTPRequestHandler):
    """A /metrics that sends SIGTERM to the test's process while the scrape waits for its answer, and answers once
    the stop flag is set (the handler ran in the main thread, inside the scrape)."""

    stop: StopSignals | None = None

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while not (self.stop is not None and self.stop.requested.is_set()) and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:  # the scrape was torn down
            pass

    def log_message(self, *args: object) -> None:
        pass


def test_sigterm_during_a_scrape_lets_it_finish_and_stops_after() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SignalledMetrics)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    probe = LoadProbe([("decode", f"http://127.0.0.1:{server.server_address[1]}")], {})
    read: list[list[InstanceTotals]] = []
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"), termination_as_interrupt() as stop:
            _SignalledMetrics.stop = stop
            read.append(probe.read())  # the SIGTERM lands while this waits: it must not be cut
        assert read and read[0][0].role == "decode", "the scrape was interrupted by the signal"
    finally:
        _SignalledMetrics.stop = None
        closer = threading.Thread(target=probe.close, daemon=True)
        closer.start()
        closer.join(10.0)
        server.shutdown()
        server.server_close()
    assert not closer.is_alive(), "the probe's close() waits on a lock the interrupted scrape left held"


def test_a_stop_ends_a_rate_s_requests_promptly() -> None:
    """measure() looks at `should_stop` while the requests wait: a server that never answers holds it no longer."""
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog), never answers
    cfg = ServeBenchConfig(base_url=f"http://127.0.0.1:{listener.getsockname()[1]}", num_prompts=2,
                           random_input_len=4, random_output_len=2)
    asked = time.monotonic() + 0.5
    try:
        started = time.monotonic()
        with pytest.raises(StopRequested):
            measure(cfg, Console(quiet=True), should_stop=lambda: time.monotonic() > asked)
        assert time.monotonic() - started < 5.0
    finally:
        listener.close()
