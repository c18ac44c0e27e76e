"""`pdlaunch smoke` on CUDA: prefill and decode sharing GPU 0 (KV pushed), compared with colocated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pdlaunch.launcher.ports import PortAllocator
from tests.serving.e2e import children_of

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gpu-1p1d-single.yaml"


def test_gpu_smoke_one_shared_gpu(tmp_path: Path) -> None:
    port = PortAllocator("127.0.0.1").free("smoke proxy")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdlaunch", "smoke", str(EXAMPLE), "--port", str(port),
         "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "smoke passed" in output and "cuda:0" in output
    assert children_of(proc.pid) == []
