"""End to end: `pdlaunch serve` of one prefill group and two decode groups (as a multi-node config, or two
decode TP sizes, has them): three instances named prefill-0, decode-0 and decode-1, each with its own log file
and engine_id, and both decodes serve requests with KV from the prefill."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.serving.e2e import Serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = """\
proxy: {routing_policy: round_robin}
instances:
  - {role: prefill, count: 1}
  - {role: decode, count: 1}
  - {role: decode, count: 1}
"""


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("e2e-names")
    config = tmp / "two-decode-groups.yaml"
    config.write_text(CONFIG)
    deployment = Serve(tmp, [str(config), "--model", "tiny", "--num-gpu-blocks", "256", "--block-size", "8"])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


def _kv_bytes_landed(url: str) -> float:
    """pdlaunch_kv_transfer_bytes_total of the instance at `url`: KV bytes that arrived there over transfers."""
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("pdlaunch_kv_transfer_bytes_total "):
            return float(line.split()[1])
    return 0.0


def test_each_instance_has_a_name_engine_id_and_log_of_its_own(serve: Serve) -> None:
    instances = httpx.get(f"{serve.url}/instances", timeout=5).json()
    assert sorted((i["name"], i["role"], i["state"]) for i in instances) == [
        ("decode-0", "decode", "ready"), ("decode-1", "decode", "ready"), ("prefill-0", "prefill", "ready")]
    assert len({i["url"] for i in instances}) == 3
    engine_ids = set()
    for instance in instances:
        info = httpx.get(f"{instance['url']}/info", timeout=5).json()
        assert info["name"] == instance["name"] and info["engine_id"].endswith(f"-{instance['name']}")
        engine_ids.add(info["engine_id"])
        log = (serve.log_dir / f"{instance['name']}.log").read_text(errors="replace")
        assert info["engine_id"] in log  # the instance's own log, not one shared with another
    assert len(engine_ids) == 3


def test_both_decodes_serve_with_kv_from_the_prefill(serve: Serve) -> None:
    client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=120, max_retries=0)
    model = client.models.list().data[0].id
    for n in range(4):  # round robin: two requests for each decode
        out = client.completions.create(model=model, prompt=f"request {n}: " + "the quick brown fox " * 6,
                                        max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        assert out.usage is not None and out.usage.completion_tokens == 4
    decodes = {name: url for name, url in serve.instance_urls().items() if name.startswith("decode-")}
    landed = {name: _kv_bytes_landed(url) for name, url in decodes.items()}
    assert sorted(landed) == ["decode-0", "decode-1"] and all(b > 0 for b in landed.values()), landed
