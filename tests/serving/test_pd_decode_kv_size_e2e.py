"""A PD request the decode's KV cache can never hold is refused before the prefill computes its prompt, through real
processes: a prefill and a decode instance (`python -m pdlaunch.server`, tiny model on CPU, real NIXL) and the proxy
(`python -m pdlaunch.proxy`), each started as `pdlaunch serve` starts them.

The decode holds 16 blocks of 8 tokens (128 tokens) under a max_model_len of 256, as a decode whose GPU memory
profile left it a small KV cache does. `pdlaunch serve` refuses such a KV cache on the CPU, where its size is
configured rather than measured (a CPU KV cache must hold one max_model_len sequence), so the two instances here get
deployment files that differ in cache.num_gpu_blocks only. The decode reports its KV cache in its /health, the proxy
passes it on the prefill leg (decode_limits.kv_cache) and the prefill answers the decode's own 400 without computing:
its pdlaunch_prompt_tokens_computed does not move, nor does anything stay held."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.ports import PortAllocator
from tests.kv_transfer.deployment_secret import TEST_SECRET
from tests.serving.helpers import held_kv, prompt_from, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

START_TIMEOUT_S = 240.0  # three processes importing torch, two building engines, on a loaded 2-core machine
TIMEOUT = 180.0
MAX_MODEL_LEN, BLOCK_SIZE, DECODE_BLOCKS = 256, 8, 16  # the decode holds 128 tokens of one request
MODEL = "tiny"

_first_ids = itertools.count(3, 7)  # each prompt starts with its own token: nothing of it is in a prefix cache


@dataclass
class Deployment:
    prefill: str
    decode: str
    proxy: str


def _deployment_file(tmp: Path, role: str, num_blocks: int) -> Path:
    path = tmp / f"{role}.json"
    path.write_text(DeploymentConfig.model_validate({
        "device": "cpu", "instances": [{"role": "prefill"}, {"role": "decode"}],
        "model": {"path": MODEL, "max_model_len": MAX_MODEL_LEN},
        "cache": {"num_gpu_blocks": num_blocks, "block_size": BLOCK_SIZE},
        "kv_transfer": {"transfer_mode": "pull", "kv_lease_seconds": 30.0},
        "security": {"deployment_secret": TEST_SECRET},
    }).model_dump_json())
    return path


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("decode-kv-size")
    ports = PortAllocator("127.0.0.1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PDLAUNCH_DEPLOYMENT_SECRET": TEST_SECRET}
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(name: str, argv: list[str]) -> None:
        log = tmp / f"{name}.log"
        with open(log, "wb") as out:
            procs.append((subprocess.Popen([sys.executable, "-m", *argv], stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env, start_new_session=True), log))

    def alive_and(url: str) -> bool:
        for proc, log in procs:
            assert proc.poll() is None, f"{log.stem} exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        return _answers(url)

    urls = {}
    try:
        for role, blocks in (("prefill", 64), ("decode", DECODE_BLOCKS)):
            port = ports.free(f"the {role} instance")
            spec = {"role": role, "port": port, "engine_id": f"kv-size-{role}"}
            start(role, ["pdlaunch.server", "--deployment", str(_deployment_file(tmp, role, blocks)),
                         "--instance", json.dumps(spec), "--parent-pid", str(os.getpid())])
            urls[role] = f"http://127.0.0.1:{port}"
        port = ports.free("the proxy")
        start("proxy", ["pdlaunch.proxy", "--port", str(port), "--prefill", f"prefill-0={urls['prefill']}",
                        "--decode", f"decode-0={urls['decode']}", "--parent-pid", str(os.getpid())])
        proxy = f"http://127.0.0.1:{port}"
        wait_for(lambda: alive_and(proxy), "the proxy to see both instances ready", START_TIMEOUT_S, poll=0.5)
        yield Deployment(urls["prefill"], urls["decode"], proxy)
    finally:
        for proc, _ in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _computed(url: str) -> float:
    """pdlaunch_prompt_tokens_computed of the instance at `url`: the prompt tokens it computed since it started."""
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "pdlaunch_prompt_tokens_computed" for sample in family.samples
               if sample.name.endswith("_total"))


def _holding(url: str) -> tuple[int, int]:
    return held_kv(url, TIMEOUT)


def _prompt(tokens: int) -> list[int]:
    return prompt_from(next(_first_ids), tokens)


# (endpoint, body without its prompt, the prompt's tokens): prompt + max_tokens within max_model_len, past the 128
# tokens the decode's KV cache holds
REFUSED: dict[str, tuple[str, dict[str, Any], int]] = {
    "max_tokens": ("completions", {"max_tokens": 200}, 20),
    "one block past": ("completions", {"max_tokens": 109}, 20),  # 129 tokens: 17 blocks
    "max_completion_tokens": ("chat/completions", {"max_completion_tokens": 200}, 0),
    "streamed": ("completions", {"max_tokens": 200, "stream": True}, 20),
    "n": ("completions", {"max_tokens": 200, "n": 2}, 20),
    # no limit: the room its prompt leaves of the 128 tokens the decode holds, at least one token (129 tokens)
    "no limit, a prompt the cache holds alone": ("completions", {"max_tokens": None}, 128),
    "min_tokens past the cache's room": ("completions", {"max_tokens": None, "min_tokens": 120}, 20),
}


def _body(endpoint: str, extra: dict[str, Any], size: int) -> dict[str, Any]:
    if endpoint == "completions":
        prompt: dict[str, Any] = {"prompt": _prompt(size)}
    else:
        prompt = {"messages": [{"role": "user", "content": f"hello {next(_first_ids)}"}]}
    return {"model": MODEL, "temperature": 0.0, **prompt, **extra}


def test_the_decode_reports_its_kv_cache(deployment: Deployment) -> None:
    health = httpx.get(f"{deployment.decode}/health", timeout=TIMEOUT).json()
    assert health["kv_capacity"] == {"num_blocks": DECODE_BLOCKS, "block_size": BLOCK_SIZE, "window_blocks": None}


@pytest.mark.parametrize("case", REFUSED)
def test_a_request_past_the_decode_s_kv_cache_costs_the_prefill_nothing(deployment: Deployment, case: str) -> None:
    endpoint, extra, size = REFUSED[case]
    body = _body(endpoint, extra, size)
    alone = httpx.post(f"{deployment.decode}/v1/{endpoint}", json=body, timeout=TIMEOUT)
    assert alone.status_code == 400, alone.text  # the decode's own refusal, the answer the client is to get
    assert "KV blocks but the cache has 16" in alone.text or "may reach 128" in alone.text, alone.text
    before, held = _computed(deployment.prefill), _holding(deployment.prefill)
    r = httpx.post(f"{deployment.proxy}/v1/{endpoint}", json=body, timeout=TIMEOUT)
    assert (r.status_code, r.json()) == (400, alone.json())
    assert _computed(deployment.prefill) == before, f"the prefill computed the prompt of a request refused: {r.text}"
    # nothing held nor kept for the refused request (an earlier test's hold may only have gone back since)
    assert all(now <= then for now, then in zip(_holding(deployment.prefill), held, strict=True))


def test_a_request_the_decode_s_kv_cache_holds_is_prefilled_and_answered(deployment: Deployment) -> None:
    """128 tokens, all 16 of the decode's blocks: the prefill computes the prompt and the decode answers."""
    body = _body("completions", {"max_tokens": 108, "ignore_eos": True}, 20)
    before = _computed(deployment.prefill)
    r = httpx.post(f"{deployment.proxy}/v1/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 108
    assert _computed(deployment.prefill) > before
