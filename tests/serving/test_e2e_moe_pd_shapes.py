"""End to end: `pdlaunch serve` 1P1D on CPU with MoE checkpoints where prefill and decode differ in TP size
and expert placement, and over the Mooncake connector: a Qwen3-MoE over `--kv-connector mooncake` with
prefill at TP 1 and decode at TP 2 with whole experts per rank; a Mixtral over NIXL with prefill at TP 2
with whole experts per rank and decode at TP 1. Greedy token ids equal a colocated engine's, and KV moved."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.kv_transfer.mooncake_skip import requires_mooncake
from tests.kv_transfer.test_pd_engines import GREEDY, colocated
from tests.serving.e2e import Serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# 1 token; 51 tokens over four 16-token blocks (the last one partial)
PROMPTS = {"one-token": [17], "many-blocks": [(i * 37) % 480 + 3 for i in range(51)]}
EP_LOG = "MoE: whole experts per rank (expert parallel) over TP 2"


@pytest.mark.parametrize("kind,args,connector,ep_role", [
    pytest.param("qwen3_moe", ["--kv-connector", "mooncake", "--prefill-tp", "1", "--decode-tp", "2",
                               "--decode-expert-parallel"], "mooncake", "decode",
                 marks=requires_mooncake, id="mooncake-p1-d2ep"),
    pytest.param("mixtral", ["--prefill-tp", "2", "--prefill-expert-parallel", "--decode-tp", "1"], "nixl",
                 "prefill", id="nixl-p2ep-d1"),
])
def test_pd_moe_with_other_tp_per_role_equals_colocated(kind: str, args: list[str], connector: str, ep_role: str,
                                                        moe_ckpt: Callable[[str], Path], tmp_path: Path) -> None:
    path = moe_ckpt(kind)
    expected = colocated(path, PROMPTS)
    serve = Serve(tmp_path, ["--model", str(path), "--prefill", "1", "--decode", "1", "--num-gpu-blocks", "128",
                             "--dtype", "float32", *args])
    try:
        serve.wait_ready()
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=120, max_retries=0)
        model = httpx.get(f"{serve.url}/v1/models", timeout=5).json()["data"][0]["id"]
        for name, prompt in PROMPTS.items():
            out = client.completions.create(model=model, prompt=prompt, max_tokens=GREEDY["max_tokens"],
                                            temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
            assert out.choices[0].model_extra["token_ids"] == expected[name], name
        moved = 0.0
        for instance, url in serve.instance_urls().items():
            assert httpx.get(f"{url}/info", timeout=5).json()["kv_connector"] == connector, instance
            for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
                if line.startswith("pdlaunch_kv_transfer_bytes_total "):
                    moved += float(line.split()[1])
        assert moved > 0, f"the decode instance did not receive KV over {connector}"
        assert EP_LOG in (serve.log_dir / f"{ep_role}-0.log").read_text(errors="replace")
    finally:
        serve.stop()
