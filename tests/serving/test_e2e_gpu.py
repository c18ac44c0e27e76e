"""`pdlaunch smoke` on CUDA: prefill and decode sharing GPU 0 (KV pushed), compared with colocated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pdlaunch.launcher.ports import PortAllocator
from tests.serving.e2e import Serve, children_of
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gpu-1p1d-single.yaml"


def test_gpu_smoke_one_shared_gpu(tmp_path: Path) -> None:
    port = PortAllocator("127.0.0.1").free("smoke proxy")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdlaunch", "smoke", str(EXAMPLE), "--port", str(port), "--model", "tiny",
         "--log-dir", str(tmp_path / "logs")],  # tiny: GPU hosts here cannot fetch the demo model from PyPI
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        logs = "\n".join(f"--- {log.name} (last 40 lines)\n" + "\n".join(log.read_text().splitlines()[-40:])
                         for log in sorted((tmp_path / "logs").rglob("*.log")))
        pytest.fail(f"pdlaunch smoke did not finish within 600 s; its output:\n{output}\n{logs}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "smoke passed" in output and "cuda:0" in output
    assert children_of(proc.pid) == []


SLEEP_YAML = """
device: cuda
model: {path: tiny, dtype: bfloat16, enable_sleep_mode: true, max_model_len: 1024}
cache: {gpu_memory_utilization: 0.4}
kv_transfer: {transfer_mode: push}
instances:
  - {role: prefill, count: 1, devices: [0]}
  - {role: decode, count: 1, devices: [0]}
"""


def test_sleep_and_wake_through_the_proxy(tmp_path: Path) -> None:
    config = tmp_path / "sleep.yaml"
    config.write_text(SLEEP_YAML)
    serve = Serve(tmp_path, [str(config), "--api-key", "sk-sleep"], device="cuda")  # control routes need a key
    http = httpx.Client(headers={"Authorization": "Bearer sk-sleep"})
    try:
        serve.wait_ready()
        assert http.post(f"{serve.url}/sleep", headers={"Authorization": ""}).status_code == 401
        body = {"model": "tiny", "prompt": "Sleep well", "max_tokens": 8, "temperature": 0}
        before = http.post(f"{serve.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        slept = http.post(f"{serve.url}/sleep", params={"level": 1}, timeout=120)
        assert slept.status_code == 200, slept.text
        assert all(i["body"]["freed_bytes"] > 0 for i in slept.json()["instances"])
        states = http.get(f"{serve.url}/is_sleeping", timeout=30).json()["instances"]
        assert all(i["body"]["is_sleeping"] for i in states)
        wait_for(lambda: http.post(f"{serve.url}/v1/completions", json=body, timeout=30).status_code == 503,
                 "the proxy to stop routing to sleeping instances")
        woke = http.post(f"{serve.url}/wake_up", timeout=120)
        assert woke.status_code == 200 and not any(i["body"]["is_sleeping"] for i in woke.json()["instances"])
        wait_for(lambda: httpx.get(f"{serve.url}/health", timeout=5).status_code == 200, "the proxy to see them awake")
        after = http.post(f"{serve.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert after == before
    finally:
        http.close()
        serve.stop()
    assert serve.proc.returncode == 0, serve.output


CROWDED_YAML = """
device: cuda
model: {path: tiny, dtype: bfloat16, max_model_len: 1024}
cache: {gpu_memory_utilization: 0.9}
colocated: true
instances:
  - {role: colocated, count: 1, devices: [0]}
"""


def _serve_beside(tmp_path: Path, yaml: str, held_bytes: int) -> subprocess.CompletedProcess[str]:
    """`pdlaunch serve` of `yaml` run to its end while this process holds `held_bytes` of GPU 0 (freed after)."""
    import torch

    config = tmp_path / "crowded.yaml"
    config.write_text(yaml)
    held = torch.empty(max(0, held_bytes), dtype=torch.uint8, device="cuda")
    port = PortAllocator("127.0.0.1").free("crowded proxy")
    try:
        return subprocess.run([sys.executable, "-m", "pdlaunch", "serve", str(config), "--port", str(port),
                               "--log-dir", str(tmp_path / "logs")], capture_output=True, text=True, timeout=400)
    finally:
        del held
        torch.cuda.empty_cache()


def test_kv_cache_that_does_not_fit_next_to_another_process_is_a_clear_error(tmp_path: Path) -> None:
    """Another process holds half the GPU: an instance asked for 90% of it stops with the field to change and
    the free memory it found, no traceback, and serve exits 1 with that line."""
    import torch

    free, total = torch.cuda.mem_get_info(0)
    done = _serve_beside(tmp_path, CROWDED_YAML, held_bytes=free - total // 2)  # this process: half the GPU
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "cache.gpu_memory_utilization: the KV cache" in output and "GiB are free on cuda:0" in output, output
    assert "Traceback" not in output, output


def test_weights_that_do_not_fit_next_to_another_process_are_a_clear_error(tmp_path: Path) -> None:
    """Another process leaves 1.5 GiB of the GPU free: an instance of a 3 GiB checkpoint (the 8B shape cut to two
    layers) stops with model.path, the free memory and what to do, no traceback, and serve exits 1 with that line."""
    import torch

    checkpoint = tmp_path / "l8b-2"
    made = subprocess.run([sys.executable, "-m", "pdlaunch", "bench", "make-checkpoint", str(checkpoint),
                           "--num-layers", "2", "--device", "cuda"], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    yaml = CROWDED_YAML.replace("path: tiny", f"path: {checkpoint}").replace("0.9}", "0.5}")
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(0)
    done = _serve_beside(tmp_path, yaml, held_bytes=free - 3 * 2**29)  # leaves 1.5 GiB free
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "model.path: the model's weights did not fit in GPU memory" in output, output
    assert "GiB are free on cuda:0" in output and "--tp" in output, output
    assert "Traceback" not in output, output
