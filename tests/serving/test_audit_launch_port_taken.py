"""Another server takes the proxy's port while `pdlaunch serve` loads its instances (a second deployment on the
same port, any service with a /health): its answer is not taken for the proxy's. Serve exits 1 naming the
proxy, its exit and its log (address already in use) instead of announcing the other server's API as its own
and then restarting its proxy forever, each restart "ready again" on the other server's answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.serving.e2e import READY_LINE, Serve, alive, children_of, wait_gone
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXIT_TIMEOUT_S = 180.0  # the instance loads on a loaded 2-core box, then the proxy fails to bind


class _Healthy(BaseHTTPRequestHandler):
    """Answers every GET 200 with a JSON body, as many services' /health does."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps({"status": "ok", "pid": os.getpid(), "instances": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[Serve]:
    started = Serve(tmp_path, ["--model", "tiny", "--colocated", "--num-gpu-blocks", "128"])
    try:
        yield started
    finally:
        started.stop()


def test_another_server_on_the_proxy_port_is_not_taken_for_the_proxy(serve: Serve) -> None:
    # The instance's log appears once the plan has bind-tested the proxy port: the port is taken after that.
    wait_for(lambda: (serve.log_dir / "colocated-0.log").exists() or serve.proc.poll() is not None,
             "the instance to be started", 120, poll=0.01)
    squatter = ThreadingHTTPServer(("127.0.0.1", serve.port), _Healthy)
    thread = threading.Thread(target=squatter.serve_forever, daemon=True)
    thread.start()
    try:
        children = children_of(serve.proc.pid)
        try:
            code = serve.proc.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not stop within {EXIT_TIMEOUT_S:.0f}s:\n{serve.output}")
    finally:
        squatter.shutdown()
        squatter.server_close()
    output = " ".join(serve.output.split())  # named even if a line wrapped
    assert code == 1, output
    assert READY_LINE not in output, output
    assert "error: proxy (pid " in output and "exited with code" in output, output
    assert str(serve.log_dir / "proxy.log") in output and "address already in use" in output, output
    assert "Traceback" not in output, output
    wait_gone(children)
    assert not alive(children_of(serve.proc.pid))


def test_a_server_on_a_dead_proxy_s_port_is_not_taken_for_the_restarted_proxy(serve: Serve) -> None:
    """The proxy dies while serving and another server takes its port before the restart binds it: the
    supervisor took that server's /health for the restarted proxy's ("ready again"), while the restart itself
    failed on the taken port. Now each restart fails as what it is and none is called ready."""
    serve.wait_ready()
    proxy_pid = int(httpx.get(f"{serve.url}/health", timeout=10).json()["pid"])
    os.kill(proxy_pid, signal.SIGKILL)
    wait_for(lambda: not alive([proxy_pid]), "the proxy to die", 30)
    squatter = wait_for(lambda: _squat(serve.port), "the proxy's port to be free for the squatter", 30, poll=0.01)
    thread = threading.Thread(target=squatter.serve_forever, daemon=True)
    thread.start()
    try:
        wait_for(lambda: "proxy: restart 2" in serve.output or serve.proc.poll() is not None,
                 "the first restart of the proxy to fail on the taken port and a second to start", EXIT_TIMEOUT_S)
    finally:
        squatter.shutdown()
        squatter.server_close()
    output = " ".join(serve.output.split())
    assert "proxy: restart 2" in output, output
    assert "proxy is ready again" not in output, output


def _squat(port: int) -> ThreadingHTTPServer | None:
    try:
        return ThreadingHTTPServer(("127.0.0.1", port), _Healthy)
    except OSError:  # the dying proxy's socket may linger a moment
        return None
