"""End to end: `pdlaunch smoke` on the demo model (PD, then colocated, compared) exits 0, leaves nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pdlaunch.launcher.ports import PortAllocator
from tests.serving.e2e import children_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_smoke_passes_and_leaves_no_process(tmp_path: Path) -> None:
    port = PortAllocator("127.0.0.1").free("smoke proxy")
    # Something else holds the asked-for port (as 8000 often is on CI machines): smoke moves on.
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdlaunch", "smoke", "--model", "tiny", "--device", "cpu", "--port", str(port),
         "--log-dir", str(tmp_path / "logs"), "--num-gpu-blocks", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=400)
    finally:
        squatter.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert f"proxy port {port} is in use" in output
    assert "smoke passed" in output and "FAIL" not in output
    for check in ("PD: KV bytes moved", "PD == colocated: completion 0", "PD: streaming", "colocated: chat"):
        assert check in output
    assert children_of(proc.pid) == []
    assert (tmp_path / "logs" / "prefill-0.log").is_file() and (tmp_path / "logs" / "decode-0.log").is_file()
