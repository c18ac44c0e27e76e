"""The platform helpers on a real GPU: what they copy, and that the launcher's checks hold no GPU memory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pdlaunch.memory import platform

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_to_device_async_copies_the_host_tensor_as_it_is_now() -> None:
    """Callers may refill one host tensor between steps: every call must copy what it holds then."""
    host = torch.arange(8, dtype=torch.int32)
    device = torch.device("cuda", 0)
    first = platform.to_device_async(host, device)
    host += 100
    second = platform.to_device_async(host, device)
    torch.cuda.synchronize()
    assert first.tolist() == list(range(8))
    assert second.tolist() == [i + 100 for i in range(8)]


# Run in a fresh process: this test process has its own CUDA context already.
_CHECK = """
import os, subprocess, sys
from pdlaunch.config.target_host import gpu_memory_bytes
total = gpu_memory_bytes("cuda", None)
apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                      capture_output=True, text=True, timeout=30).stdout.split()
print(total, str(os.getpid()) in apps)
"""


def test_the_launchers_gpu_memory_check_creates_no_cuda_context() -> None:
    """`pdlaunch serve` lives as long as the deployment: a CUDA context there would hold ~500 MiB of
    every GPU it looked at for all that time."""
    out = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    total, has_context = out.stdout.split()
    assert int(total) == min(torch.cuda.get_device_properties(i).total_memory
                             for i in range(torch.cuda.device_count()))
    assert has_context == "False", "the check created a CUDA context in the launcher process"
