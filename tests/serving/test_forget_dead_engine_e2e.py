"""`pdlaunch serve` 1P1D with push on CPU (real processes, real NIXL): SIGKILL the decode after a request; before
the supervisor restarts it, the prefill forgets the dead decode's NIXL agent (the supervisor says so, and the
prefill's /info no longer lists that engine), and a request works again through the restarted decode.

On a GPU host the same forget is what frees the dead decode's KV cache, which the prefill's UCX mapping would
keep allocated (test_forget_dead_engine_gpu.py)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving.e2e import Serve
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = """\
supervision: {restart_backoff_seconds: 0.5}
kv_transfer: {transfer_mode: push}
instances:
  - {role: prefill, count: 1}
  - {role: decode, count: 1}
"""
RESTART_TIMEOUT_S = 150.0  # a restarted instance imports torch and builds its engine on a loaded 2-core box
PROMPT = "The capital of France is Paris, and the capital of Italy is Rome; the capital of Spain is"  # blocks to move


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[Serve]:
    config = tmp_path / "pd.yaml"
    config.write_text(CONFIG)
    deployment = Serve(tmp_path, [str(config), "--model", "tiny", "--num-gpu-blocks", "256", "--block-size", "8"])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


def complete(serve: Serve) -> str:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    response = httpx.post(f"{serve.url}/v1/completions", json=body, timeout=120, trust_env=False)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def info(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/info", timeout=10, trust_env=False).json())


def decode_engines(url: str) -> list[str]:
    """The decode engines whose NIXL agents the prefill at `url` holds (/info, as its engine thread recorded)."""
    return list(info(url)["connector"]["decode_engines"])


def back(serve: Serve, url: str, engine_id: str) -> bool:
    assert serve.proc.poll() is None, f"serve exited with {serve.proc.returncode}:\n{serve.output}"
    try:
        health = httpx.get(f"{url}/health", timeout=2, trust_env=False)
        instances = httpx.get(f"{serve.url}/instances", timeout=2, trust_env=False).json()
    except httpx.HTTPError:
        return False
    return (health.status_code == 200 and health.json()["engine_id"] == engine_id
            and any(i["name"] == "decode-0" and i["state"] == "ready" for i in instances))


def test_the_prefill_forgets_a_killed_decode_before_it_restarts(serve: Serve) -> None:
    urls = serve.instance_urls()
    prefill, decode = urls["prefill-0"], urls["decode-0"]
    first = complete(serve)
    dead = info(decode)
    wait_for(lambda: decode_engines(prefill) == [dead["engine_id"]], "the prefill to hold the decode's agent", 30)

    os.kill(int(dead["pid"]), signal.SIGKILL)
    wait_for(lambda: back(serve, decode, f"{dead['engine_id']}-r1"), "decode-0 to be back after SIGKILL",
             RESTART_TIMEOUT_S, poll=0.2)
    output = serve.output
    forgot = "prefill-0 forgot decode-0's NIXL agent (1)"
    assert forgot in output, output
    assert output.index(forgot) < output.index("decode-0: restart 1 with engine_id"), output
    assert decode_engines(prefill) == []

    assert complete(serve) == first  # through the restarted decode: the prefill pushes to its new agent
    wait_for(lambda: decode_engines(prefill) == [f"{dead['engine_id']}-r1"], "the prefill to hold the new agent", 30)
