"""When `pdlaunch serve` gives up on a dead instance (exit 1, naming it, its log and what happened):
a role down past supervision.role_down_grace_seconds, supervision.max_restarts failed restarts in a
row, or a group with restart: false. The restarts are made to fail by holding the instance's port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving.e2e import Serve, alive, children_of, wait_gone
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXIT_TIMEOUT_S = 120.0  # a few failed restarts, each importing torch on a loaded 2-core box

CASES = {
    "grace": ("supervision: {restart_backoff_seconds: 0.5, max_restarts: 100, role_down_grace_seconds: 3}\n",
              ["no live colocated instance for", "(supervision.role_down_grace_seconds: 3)",
               "colocated-0 restarting (", "(it was killed by signal 9"]),  # the first cause, whatever the restarts did
    "max_restarts": ("supervision: {restart_backoff_seconds: 0.2, max_restarts: 2, role_down_grace_seconds: 300}\n",
                     ["colocated-0 exited with code 3 before it was ready again: 2 restart(s) in a row failed "
                      "(supervision.max_restarts: 2); the outage began when it was killed by signal 9",
                      "address already in use"]),  # 3: uvicorn could not bind
    "restart_off": ("instances: [{role: colocated, restart: false}]\n",
                    ["colocated-0 was killed by signal 9 (SIGKILL), and restarts are off for it "
                     "(instances[0].restart: false)"]),
}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Serve, list[str]]]:
    config_text, expected = CASES[request.param]
    config = tmp_path / "colocated.yaml"
    config.write_text(config_text)
    deployment = Serve(tmp_path, [str(config), "--colocated", "--model", "tiny", "--num-gpu-blocks", "128"])
    try:
        yield deployment.wait_ready(), expected
    finally:
        deployment.stop()


def _hold(port: int) -> socket.socket:
    """Listen on `port` as soon as the killed instance's socket is gone (before its restart binds it)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the killed server's connections linger

    def bound() -> bool:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True

    wait_for(bound, f"port {port} to be free after the SIGKILL", 10, poll=0.01)
    sock.listen()
    return sock


def test_serve_gives_up_with_a_clear_message(case: tuple[Serve, list[str]]) -> None:
    serve, expected = case
    url = serve.instance_urls()["colocated-0"]
    pid = int(httpx.get(f"{url}/info", timeout=5).json()["pid"])
    children = children_of(serve.proc.pid)
    os.kill(pid, signal.SIGKILL)
    with _hold(int(url.rsplit(":", 1)[1])):  # every restart dies at once: "address already in use"
        try:
            code = serve.proc.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not give up within {EXIT_TIMEOUT_S:.0f}s:\n{serve.output}")
    output = serve.output
    assert code == 1, output
    log = serve.log_dir / "colocated-0.log"
    error = next(line for line in output.splitlines() if line.startswith("error:"))
    assert str(log) in " ".join(output.split()), output  # named even if the line wrapped
    for text in expected:
        assert text in " ".join(output.split()), f"{text!r} not in:\n{output}"
    assert "colocated-0" in error and "Traceback" not in output
    wait_gone(children)
    assert children_of(serve.proc.pid) == [] and not alive(children)
