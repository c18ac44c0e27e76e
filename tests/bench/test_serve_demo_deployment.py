"""`pdlaunch bench serve` against a real demo PD deployment (`pdlaunch serve --model tiny --device cpu`:
prefill + decode instances over NIXL, proxy in front). Numbers are not asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from pdlaunch.bench.serve_config import ServeBenchConfig
from pdlaunch.bench.workload import sample_requests
from tests.helpers.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
READY_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def demo_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("pd_logs")
    port = free_port()
    out = open(logs / "launcher.out", "w")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pdlaunch", "serve", "--model", "tiny", "--device", "cpu", "--port", str(port),
         "--max-model-len", "512", "--log-dir", str(logs)],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert launcher.poll() is None, f"pdlaunch serve exited early:\n{(logs / 'launcher.out').read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"gave up after {READY_TIMEOUT_S:.0f}s waiting for {url}/health"
            time.sleep(0.5)
        yield url
    finally:
        launcher.send_signal(signal.SIGTERM)  # the launcher drains, stops and reaps its children
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=10)
        out.close()


def test_bench_serve_against_demo_pd_deployment(demo_deployment: str, tmp_path: Path) -> None:
    result_file = tmp_path / "demo.json"
    result = CliRunner().invoke(bench_app, [
        "serve", "--base-url", demo_deployment, "--num-prompts", "6", "--random-input-len", "24",
        "--random-output-len", "6", "--random-range-ratio", "0.25", "--request-rate", "8", "--max-concurrency", "3",
        "--num-warmups", "1", "--goodput", "ttft:10000", "--result-filename", str(result_file),
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads(result_file.read_text())
    assert doc["completed"] == 6 and doc["failed"] == 0
    assert doc["model_id"] == "tiny"
    # ignore_eos + max_tokens: every request produced exactly the tokens it asked for (the same seed
    # draws the same requests, in order)
    cfg = ServeBenchConfig(base_url=demo_deployment, num_prompts=6, random_input_len=24, random_output_len=6,
                           random_range_ratio=0.25)
    asked = sample_requests(cfg, 6, np.random.default_rng(cfg.seed))
    assert doc["output_lens"] == [r.output_len for r in asked]
    assert len(set(doc["output_lens"])) > 1
    for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms",
                "request_throughput", "request_goodput", "output_throughput", "duration"):
        assert doc[key] > 0, key
