"""A TP instance is restarted whole: a dead worker rank or a dead rank 0 brings back every rank under a
new engine_id, and no rank of the old instance is left running."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving.e2e import Serve, alive, children_of, wait_gone
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = "supervision: {restart_backoff_seconds: 0.5, role_down_grace_seconds: 300}\n"
RESTART_TIMEOUT_S = 180.0  # the engine notices a dead rank on its next (idle) step, then 2 ranks start anew


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[Serve]:
    config = tmp_path / "tp.yaml"
    config.write_text(CONFIG)
    deployment = Serve(tmp_path, [str(config), "--colocated", "--tp", "2", "--model", "tiny",
                                  "--num-gpu-blocks", "128"])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


def _workers(pid: int) -> list[int]:
    """The instance's TP worker processes (ranks 1..T-1: multiprocessing spawn children, whichever
    thread started them; not multiprocessing's resource tracker)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                out.append(int(child))
    return out


def _info(url: str) -> dict[str, object] | None:
    try:
        response = httpx.get(f"{url}/health", timeout=2, trust_env=False)
        if response.status_code != 200:
            return None
        return httpx.get(f"{url}/info", timeout=5, trust_env=False).json()
    except httpx.HTTPError:
        return None


def _ready_models(proxy_url: str) -> dict[str, Any] | None:
    response = httpx.get(f"{proxy_url}/v1/models", timeout=5, trust_env=False)
    return response.json() if response.status_code == 200 else None


def test_dead_rank_then_dead_rank0_restart_the_whole_instance(serve: Serve) -> None:
    url = serve.instance_urls()["colocated-0"]
    info = _info(url)
    assert info is not None
    planned = str(info["engine_id"])
    old: list[int] = []
    for restart, victim in ((1, "rank 1"), (2, "rank 0")):
        pid = int(info["pid"])
        workers = wait_for(lambda: _workers(pid), f"the TP worker of {pid}", 30)
        old += [pid, *workers]
        os.kill(workers[0] if victim == "rank 1" else pid, signal.SIGKILL)

        def back() -> dict[str, object] | None:
            assert serve.proc.poll() is None, f"serve exited with {serve.proc.returncode}:\n{serve.output}"
            now = _info(url)
            return now if now is not None and now["engine_id"] == f"{planned}-r{restart}" else None

        info = wait_for(back, f"colocated-0 back after its {victim} was killed", RESTART_TIMEOUT_S, poll=0.5)
        assert info["rank_engine_ids"] == [f"{planned}-r{restart}"] * 2
        wait_gone(old)  # every rank of the dead instance, not only the one killed
        assert f"colocated-0: restart {restart} with engine_id {planned}-r{restart}" in serve.output
    # The proxy's health monitor marks the instance ready again on its next probe; until then it answers 503.
    models = wait_for(lambda: _ready_models(serve.url), "the proxy to route to colocated-0 again", 30, poll=0.5)
    answer = httpx.post(f"{serve.url}/v1/completions", timeout=60, trust_env=False, json={
        "model": models["data"][0]["id"], "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert answer.status_code == 200, answer.text
    current = [int(info["pid"]), *_workers(int(info["pid"]))]
    serve.stop()
    assert serve.proc.returncode == 0, serve.output
    wait_gone(current)
    assert children_of(serve.proc.pid) == [] and not alive(old + current)
