"""An idle proxy writes no log lines: its health checks (two a second) log nothing at INFO."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pdlaunch.launcher.ports import PortAllocator
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_failures import ScriptedInstance

IDLE_S = 5.0


@pytest.mark.slow
def test_idle_proxy_log_stays_quiet(tmp_path: Path) -> None:
    ports = PortAllocator("127.0.0.1")
    prefill, decode = ScriptedInstance("prefill"), ScriptedInstance("decode")
    log_file = tmp_path / "proxy.log"
    with ThreadServer(prefill.app, ports.free("prefill")) as p, ThreadServer(decode.app, ports.free("decode")) as d, \
            open(log_file, "w") as log:
        port = ports.free("proxy")
        proc = subprocess.Popen([sys.executable, "-m", "pdlaunch.proxy", "--port", str(port), "--prefill", p.url,
                                 "--decode", d.url], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: _ready(f"http://127.0.0.1:{port}"), "the proxy to answer /health with 200", 30)
            time.sleep(1.0)  # startup lines are written by now
            before = log_file.read_text().splitlines()
            time.sleep(IDLE_S)
            after = log_file.read_text().splitlines()
        finally:
            proc.terminate()
            proc.wait(10)
    assert after == before, f"{len(after) - len(before)} lines while idle: {after[len(before):][:5]}"
    assert len(before) < 15, before
    assert any("startup objects out of the garbage collector's walks" in line for line in before), before


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_debug_gives_one_line_per_request_with_its_id(tmp_path: Path) -> None:
    ports = PortAllocator("127.0.0.1")
    prefill, decode = ScriptedInstance("prefill"), ScriptedInstance("decode")
    log_file = tmp_path / "proxy.log"
    with ThreadServer(prefill.app, ports.free("prefill")) as p, ThreadServer(decode.app, ports.free("decode")) as d, \
            open(log_file, "w") as log:
        port = ports.free("proxy")
        proc = subprocess.Popen([sys.executable, "-m", "pdlaunch.proxy", "--port", str(port), "--prefill", p.url,
                                 "--decode", d.url, "--log-level", "debug"], stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: _ready(url), "the proxy to answer /health with 200", 30)
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "stream": True},
                           headers={"X-Request-Id": "rid-debug-1"}, timeout=10)
            assert r.status_code == 200
            wait_for(lambda: "rid-debug-1" in log_file.read_text(), "the request's DEBUG line", 10)
        finally:
            proc.terminate()
            proc.wait(10)
    lines = [line for line in log_file.read_text().splitlines() if "rid-debug-1" in line]
    assert len(lines) == 1 and "prefill-0 -> decode-0" in lines[0] and "DEBUG" in lines[0], lines
