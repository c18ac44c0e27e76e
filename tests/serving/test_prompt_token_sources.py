"""vllm:prompt_tokens_by_source and vllm:prompt_tokens_cached, as vLLM splits a request's prompt: computed here
(local_compute), found in this instance's prefix cache (local_cache_hit), loaded by its connector
(external_kv_transfer); the three add up to vllm:prompt_tokens. With them vllm:prompt_tokens_recomputed, vLLM's 1 for
a prompt whose tokens but the last were all cached or loaded (the last computed anyway). A repeated prompt on one
instance (a prefix-cache hit of whole blocks), and a PD request through the real proxy (tiny model, real NIXL on CPU,
in this process): the prefill computes the prompt, the decode loads all of it. Both instances count into this
process's series (one model_name): deltas of both."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.serving.helpers import wait_for
from tests.serving.tiny_instances import MODEL, TIMEOUT, TinyPD, tiny_pd

LABELS = {"model_name": MODEL, "engine": "0"}
SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")


@pytest.fixture(scope="module")
def deployment() -> Iterator[TinyPD]:
    with tiny_pd("sources") as pd:
        yield pd


def _counts() -> dict[str, float]:
    """This process's series (model_name "tiny"): prompt tokens by source, cached, recomputed and vllm:prompt_tokens."""
    found = {source: REGISTRY.get_sample_value("vllm:prompt_tokens_by_source_total", {**LABELS, "source": source})
             for source in SOURCES}
    found["cached"] = REGISTRY.get_sample_value("vllm:prompt_tokens_cached_total", LABELS)
    found["recomputed"] = REGISTRY.get_sample_value("vllm:prompt_tokens_recomputed_total", LABELS)
    found["prompt"] = REGISTRY.get_sample_value("vllm:prompt_tokens_total", LABELS)
    assert None not in found.values(), found  # every series exists from the start
    return {key: float(value or 0) for key, value in found.items()}


def _delta(before: dict[str, float]) -> dict[str, float]:
    return {key: value - before[key] for key, value in _counts().items()}


def _complete(url: str, prompt: str | list[int]) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0.0})
    assert r.status_code == 200, r.text
    usage: dict[str, Any] = r.json()["usage"]
    return usage


def test_a_prefix_cache_hit_counts_as_local_cache_hit(deployment: TinyPD) -> None:
    """The first request of a prompt computes all of it; the second finds its whole blocks in the prefix cache."""
    prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    before = _counts()
    first = _complete(deployment.decode, prompt)
    length = first["prompt_tokens"]
    assert length > 16 and first["prompt_tokens_details"]["cached_tokens"] == 0, first
    assert _delta(before) == {"local_compute": length, "local_cache_hit": 0, "external_kv_transfer": 0,
                              "cached": 0, "recomputed": 0, "prompt": length}
    before = _counts()
    cached = _complete(deployment.decode, prompt)["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 16 and cached % 8 == 0, cached  # whole blocks of 8
    assert _delta(before) == {"local_compute": length - cached, "local_cache_hit": cached,
                              "external_kv_transfer": 0, "cached": cached, "recomputed": 0, "prompt": length}


def test_a_pd_decode_counts_its_loaded_prompt_as_external(deployment: TinyPD) -> None:
    """The prefill leg computes the prompt (shorter than a block: no prefix hit); the decode loads all of it."""
    before = _counts()
    usage = _complete(deployment.proxy, "Paris is the capital of")
    length = usage["prompt_tokens"]
    assert length < 8, usage
    # the prefill leg's and the decode's; the decode continues from its prefill's first token: it recomputes nothing
    assert _delta(before) == {"local_compute": length, "local_cache_hit": 0, "external_kv_transfer": length,
                              "cached": length, "recomputed": 0, "prompt": 2 * length}
    for url in (deployment.prefill, deployment.decode):
        wait_for(lambda: httpx.get(f"{url}/info").json()["num_blocks_used"] == 0, f"{url} to hold no KV", 60)


@pytest.mark.parametrize(("length", "recomputed"), [(17, 1), (16, 0)])
def test_a_prompt_cached_but_its_last_token_counts_one_recomputed(deployment: TinyPD, length: int,
                                                                   recomputed: int) -> None:
    """Repeated, a prompt of two blocks and a token finds all but its last token in the prefix cache: vLLM counts that
    last one as recomputed. One of two whole blocks finds only its first (a hit stops short of the last token): none."""
    prompt = list(range(300 + length, 300 + 2 * length))  # token ids no other test of this module sends
    assert _complete(deployment.decode, prompt)["prompt_tokens"] == length
    before = _counts()
    assert _complete(deployment.decode, prompt)["prompt_tokens_details"]["cached_tokens"] == (16 if recomputed else 8)
    cached = length - 1 if recomputed else 8
    assert _delta(before) == {"local_compute": length - cached, "local_cache_hit": cached, "external_kv_transfer": 0,
                              "cached": cached, "recomputed": recomputed, "prompt": length}
