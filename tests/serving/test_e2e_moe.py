"""End to end: `pdlaunch serve` 1P1D on CPU with a Qwen3-MoE checkpoint, prefill at TP 2 (experts split
by width across its ranks), decode at TP 1, KV moved between them: answers are transformers' greedy ids."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pdlaunch.model.tokenizer import Tokenizer
from tests.helpers.checkpoints import hf_greedy
from tests.serving.e2e import Serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = ["The quick brown fox jumps over the lazy dog and", "Once upon a time"]


@pytest.fixture(scope="module")
def serve(moe_ckpt: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    deployment = Serve(tmp_path_factory.mktemp("e2e-moe"), [
        "--model", str(moe_ckpt("qwen3_moe")), "--prefill", "1", "--decode", "1", "--prefill-tp", "2",
        "--decode-tp", "1", "--num-gpu-blocks", "128", "--dtype", "float32"])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


def test_pd_moe_answers_equal_transformers_greedy(serve: Serve, moe_ckpt: Callable[[str], Path]) -> None:
    path = moe_ckpt("qwen3_moe")
    tokenizer = Tokenizer(path)
    client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=120, max_retries=0)
    model = httpx.get(f"{serve.url}/v1/models", timeout=5).json()["data"][0]["id"]
    for prompt in PROMPTS:
        out = client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0)
        expected = hf_greedy(path, tokenizer.encode(prompt), 32, stop_at_eos=True)
        assert out.choices[0].text == tokenizer.decode(expected), (prompt, expected)
    moved = 0.0
    for url in serve.instance_urls().values():
        for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
            if line.startswith("pdlaunch_kv_transfer_bytes_total "):
                moved += float(line.split()[1])
    assert moved > 0, "the decode instance did not receive KV"
