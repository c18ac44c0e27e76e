"""Through `pdlaunch serve --model tiny` (1 prefill + 1 decode, real processes): vLLM's push proxy drives
the launched instances (the launcher tells decodes where the prefills are); one scrape of the proxy's
/metrics has every instance's vLLM series with exact token counts after a known workload; an idle
deployment writes no log lines."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdlaunch.launcher.ports import PortAllocator
from tests.serving.e2e import Serve
from tests.serving.helpers import ThreadServer
from tests.serving.vllm_proxy_standins import vllm_proxy_app

VLLM_SERIES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
    "vllm:nixl_xfer_time_seconds_count", "vllm:nixl_bytes_transferred_sum",
    "vllm:request_time_per_output_token_seconds_count", "vllm:request_decode_time_seconds_count",
    "vllm:request_params_n_count", "vllm:request_max_num_generation_tokens_count",
    "vllm:iteration_tokens_total_count", "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_sum",
]
IDLE_S = 6.0


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    deployment = Serve(tmp_path_factory.mktemp("vllm-serve"), [
        "--model", "tiny", "--prefill", "1", "--decode", "1", "--num-gpu-blocks", "256", "--max-num-seqs", "16"])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


def _scrape(url: str) -> dict[tuple[str, str], float]:
    """(sample name, role) -> value summed over other labels, from the proxy's /metrics."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name.startswith("vllm:"):
                key = (s.name, s.labels.get("role", ""))
                out[key] = out.get(key, 0.0) + s.value
    return out


@pytest.mark.slow
def test_push_proxy_drives_the_launched_instances(serve: Serve) -> None:
    urls = {i["role"]: i["url"] for i in httpx.get(f"{serve.url}/instances", timeout=5).json()}
    body: dict[str, Any] = {"model": "tiny", "prompt": "Push mode through a launched deployment, please",
                            "max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    ours = httpx.post(f"{serve.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    app = vllm_proxy_app("push", [urls["prefill"]], [urls["decode"]])
    with ThreadServer(app, PortAllocator("127.0.0.1").free("push proxy")) as proxy:
        answer = httpx.post(f"{proxy.url}/v1/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == ours


@pytest.mark.slow
def test_one_scrape_has_every_vllm_series_with_exact_token_counts(serve: Serve) -> None:
    before = _scrape(serve.url)
    prompts = ["Metrics are counted exactly here", "and a second prompt for the count", "third one"]
    prompt_tokens = 0
    for prompt in prompts:
        r = httpx.post(f"{serve.url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 0.0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        prompt_tokens += r.json()["usage"]["prompt_tokens"]
    after = _scrape(serve.url)

    def delta(name: str, role: str) -> float:
        return after.get((name, role), 0.0) - before.get((name, role), 0.0)

    for name in VLLM_SERIES:
        assert (name, "decode") in after and (name, "prefill") in after, name
    assert delta("vllm:prompt_tokens_total", "decode") == prompt_tokens
    assert delta("vllm:prompt_tokens_total", "prefill") == prompt_tokens
    assert delta("vllm:generation_tokens_total", "decode") == 5 * len(prompts)
    assert delta("vllm:generation_tokens_total", "prefill") == len(prompts)  # the prefill leg's one token
    assert delta("vllm:request_success_total", "decode") == len(prompts)
    assert delta("vllm:time_to_first_token_seconds_count", "decode") == len(prompts)
    assert delta("vllm:inter_token_latency_seconds_count", "decode") == 4 * len(prompts)
    assert delta("vllm:e2e_request_latency_seconds_count", "decode") == len(prompts)
    assert delta("vllm:request_queue_time_seconds_count", "decode") == len(prompts)
    assert delta("vllm:prefix_cache_queries_total", "decode") == prompt_tokens
    assert delta("vllm:request_time_per_output_token_seconds_count", "decode") == len(prompts)
    # the prefill legs (one token each) observe 0 there, as vLLM's prefill instances do: one per request
    assert delta("vllm:request_time_per_output_token_seconds_count", "prefill") == \
        delta("vllm:e2e_request_latency_seconds_count", "prefill") == len(prompts)
    assert delta("vllm:request_params_n_count", "decode") == len(prompts)
    assert delta("vllm:request_max_num_generation_tokens_sum", "decode") == 5 * len(prompts)
    assert ("vllm:time_per_output_token_seconds_count", "decode") not in after  # vLLM's removed name
    assert delta("vllm:request_generation_tokens_sum", "decode") == 5 * len(prompts)
    assert delta("vllm:nixl_xfer_time_seconds_count", "decode") >= 1
    assert delta("vllm:nixl_bytes_transferred_sum", "decode") > 0
    assert 0.0 <= after[("vllm:kv_cache_usage_perc", "decode")] <= 1.0


@pytest.mark.slow
def test_idle_deployment_writes_no_log_lines(serve: Serve) -> None:
    time.sleep(2.0)  # the last requests' lines are out
    files = sorted(Path(serve.log_dir).glob("*.log")) + [serve.output_path]
    before = {f: f.read_bytes().count(b"\n") for f in files}
    time.sleep(IDLE_S)
    after = {f: f.read_bytes().count(b"\n") for f in files}
    grew = {f.name: after[f] - before[f] for f in files if after[f] != before[f]}
    assert not grew, f"lines written while idle: {grew}"
