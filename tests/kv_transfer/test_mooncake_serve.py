"""`pdlaunch serve --kv-connector mooncake` 1P1D on CPU, driven by the openai client: greedy outputs equal
transformers' for 1-token, one-block and many-block prompts, streamed and not; /info and the instance
log state the connector and its transport; KV moved and every block came back."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers.checkpoints import hf_greedy
from tests.kv_transfer.mooncake_skip import requires_mooncake
from tests.serving.e2e import Serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow, requires_mooncake]

BLOCK = 16  # cache.block_size default
_rng = random.Random(19)
PROMPTS = {"one-token": [17], "one-block": [_rng.randrange(3, 500) for _ in range(BLOCK)],
           "many-blocks": [_rng.randrange(3, 500) for _ in range(4 * BLOCK + 5)]}


@pytest.fixture(scope="module")
def serve(llama_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    deployment = Serve(tmp_path_factory.mktemp("e2e-mooncake"), [
        "--model", str(llama_ckpt), "--prefill", "1", "--decode", "1", "--kv-connector", "mooncake",
        "--num-gpu-blocks", "256"])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def client(serve: Serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=120, max_retries=0)


def _model(serve: Serve) -> str:
    return httpx.get(f"{serve.url}/v1/models", timeout=5).json()["data"][0]["id"]


def test_info_and_log_state_mooncake_and_its_transport(serve: Serve) -> None:
    for name, url in serve.instance_urls().items():
        info = httpx.get(f"{url}/info", timeout=5).json()
        assert info["kv_connector"] == "mooncake", name
        assert (info["connector"]["connector"], info["connector"]["transport"]) == ("mooncake", "tcp"), name
    logs = "".join(p.read_text(errors="replace") for p in serve.log_dir.rglob("*.log"))
    assert "Mooncake connector (prefill" in logs and "Mooncake connector (decode" in logs
    assert "transport tcp" in logs


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_pd_equals_transformers_streamed_and_not(serve: Serve, client: openai.OpenAI, llama_ckpt: Path,
                                                        name: str) -> None:
    prompt = PROMPTS[name]
    reference = hf_greedy(llama_ckpt, prompt, 8)
    out = client.completions.create(model=_model(serve), prompt=prompt, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == reference
    stream = client.completions.create(model=_model(serve), prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == out.choices[0].text


def test_kv_moved_and_every_block_came_back(serve: Serve, client: openai.OpenAI) -> None:
    client.completions.create(model=_model(serve), prompt=PROMPTS["many-blocks"], max_tokens=2, temperature=0)
    metrics = {name: httpx.get(f"{url}/metrics", timeout=5).text for name, url in serve.instance_urls().items()}
    moved = sum(float(line.split()[1]) for text in metrics.values() for line in text.splitlines()
                if line.startswith("pdlaunch_kv_transfer_bytes_total "))
    assert moved > 0, "the decode instance did not receive KV over Mooncake"
    deadline = time.monotonic() + 30
    while True:
        used = [httpx.get(f"{url}/info", timeout=5).json()["num_blocks_used"] for url in serve.instance_urls().values()]
        if not any(used) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert used == [0, 0]
