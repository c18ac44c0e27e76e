"""`pdlaunch serve` whose own output cannot be written (`nohup pdlaunch serve > serve.log` on a disk that filled up,
a pipe whose reader went away) serves on: the first status line it could not print raised ENOSPC out of the
supervisor and stopped every instance, though they served fine. /dev/full answers every write with ENOSPC.

The test reads the launcher's output until its `ready` line and then closes the pipe (every later line is an EPIPE);
its stderr is /dev/full. An instance killed before that line (as soon as the proxy answered) is a failed start, which
stops the deployment by design: the test once killed it while the launcher still waited for the proxy's /health."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.helpers.ports import free_port
from tests.serving.e2e import START_TIMEOUT_S, alive, children_of, wait_gone
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_serve_restarts_and_stops_cleanly_when_its_output_cannot_be_written(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "colocated.yaml"
    config.write_text("supervision: {restart_backoff_seconds: 0.5}\n")
    argv = [sys.executable, "-m", "pdlaunch", "serve", str(config), "--colocated", "--model", "tiny", "--device", "cpu",
            "--num-gpu-blocks", "256", "--port", str(port), "--log-dir", str(tmp_path / "logs")]
    with open("/dev/full", "w") as full:
        launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=full, stdin=subprocess.DEVNULL, text=True)
    output = launcher.stdout
    assert output is not None
    announced = threading.Event()

    def read_until_ready() -> None:
        for line in output:  # ends at EOF too: the launcher exited before it was ready
            if line.startswith("ready"):
                announced.set()
                return

    reader = threading.Thread(target=read_until_ready, daemon=True)
    reader.start()
    children: list[int] = []
    try:
        def instance_pid() -> int | None:
            assert launcher.poll() is None, f"pdlaunch serve exited with {launcher.returncode} (logs in {tmp_path})"
            try:
                instances = httpx.get(f"{url}/instances", timeout=2).json()
                return int(httpx.get(f"{instances[0]['url']}/info", timeout=2).json()["pid"])
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                return None

        def serving() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(lambda: announced.is_set() or launcher.poll() is not None, "the launcher's `ready` line",
                 START_TIMEOUT_S, 0.5)
        assert announced.is_set(), f"pdlaunch serve exited with {launcher.returncode} (logs in {tmp_path})"
        reader.join(10)
        output.close()  # every line from now on fails with EPIPE
        first = wait_for(instance_pid, "the deployment to serve with its output closed", START_TIMEOUT_S, 0.5)
        children = children_of(launcher.pid)
        subprocess.run(["kill", "-KILL", str(first)], check=True)  # its restart is announced on the full output
        wait_for(lambda: (instance_pid() or first) != first and serving(), "the killed instance's restart",
                 START_TIMEOUT_S, 0.5)
        children = sorted(set(children) | set(children_of(launcher.pid)))
        answer = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                            timeout=60)
        assert answer.status_code == 200, answer.text
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
        wait_gone(children)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        for pid in alive(children):
            subprocess.run(["kill", "-KILL", str(pid)], check=False)
