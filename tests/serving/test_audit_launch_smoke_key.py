"""`pdlaunch smoke` with an API key outside ASCII (the proxy accepts UTF-8 keys): its requests carry the key and
pass, instead of failing before the first request is sent (a header text httpx can only write in ASCII)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdlaunch.launcher.ports import PortAllocator
from tests.serving.e2e import children_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = "clé-secrète-密钥"


def test_smoke_passes_with_a_utf8_api_key(tmp_path: Path) -> None:
    port = PortAllocator("127.0.0.1").free("smoke proxy")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdlaunch", "smoke", "--model", "tiny", "--device", "cpu", "--colocated",
         "--port", str(port), "--log-dir", str(tmp_path / "logs"), "--num-gpu-blocks", "128", "--api-key", KEY],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
        env={**os.environ, "PYTHONUTF8": "1"})  # the key reaches argv as UTF-8 whatever the machine's locale
    try:
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "smoke passed" in output and "FAIL" not in output, output
    assert "colocated: completions" in output and "colocated: streaming" in output, output
    assert children_of(proc.pid) == []
