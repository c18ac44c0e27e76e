"""End to end: decode-side prefix reuse in a 1P1D `pdlaunch serve` (tiny model, CPU, real NIXL).

A conversation's turn 2 resends turn 1 (prompt + answer) and a new message. The decode already holds
turn 1's blocks in its prefix cache (it loaded the prompt's KV and computed the answer's), so only the
blocks it lacks move; the prefill computes only what its own prefix cache lacks. Answers equal a
colocated engine's (greedy). The decode's KV cache events (`GET /v1/kv_events` of the real instance)
name turn 1's prompt blocks as the proxy would hash them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.kvcache.events import KV_EVENT, KvSnapshot, prompt_block_hashes
from tests.serving.e2e import Serve
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BS = 8
ANSWER = 12
# 45 prompt tokens: 6 blocks move whether or not the decode recomputes the last prompt token (first-token
# handover loads 45 positions, without it 44). Turn 1's prompt + answer minus the never-computed last token
# is 56 = 7 blocks: what the decode caches. Turn 2 has 45 + 12 + 20 = 77 tokens: 10 blocks either way.
TURN1 = random.Random(31).sample(range(3, 500), 45)
NEW_MESSAGE = random.Random(32).sample(range(3, 500), 20)


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    deployment = Serve(tmp_path_factory.mktemp("decode-reuse"), [
        "--model", "tiny", "--prefill", "1", "--decode", "1", "--num-gpu-blocks", "256", "--block-size", str(BS)])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


def _complete(serve: Serve, prompt: list[int]) -> list[int]:
    response = httpx.post(f"{serve.url}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": prompt, "max_tokens": ANSWER, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True})
    assert response.status_code == 200, response.text
    token_ids: list[int] = response.json()["choices"][0]["token_ids"]
    assert len(token_ids) == ANSWER
    return token_ids


def _metrics(url: str) -> dict[str, float]:
    wanted = ("pdlaunch_kv_transfer_bytes_total", "pdlaunch_decode_prefix_hit_tokens_total",
              "pdlaunch_kv_integrity_checks_total", "pdlaunch_kv_integrity_failures_total")
    values = {name: 0.0 for name in wanted}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values


def _stats(url: str) -> dict[str, Any]:
    info: dict[str, Any] = httpx.get(f"{url}/info", timeout=10).json()
    return info


def test_turn_two_moves_only_the_blocks_the_decode_lacks(serve: Serve) -> None:
    urls = serve.instance_urls()
    prefill, decode = urls["prefill-0"], urls["decode-0"]
    with httpx.stream("GET", f"{decode}/v1/kv_events", timeout=60) as events:
        lines = (line for line in events.iter_lines() if line)  # empty lines: heartbeats of an idle stream
        snapshot = KV_EVENT.validate_json(next(lines))
        assert isinstance(snapshot, KvSnapshot) and snapshot.block_size == BS
        cached = set(snapshot.hashes)

        before = _metrics(decode)
        answer1 = _complete(serve, TURN1)
        turn1 = _metrics(decode)
        moved1 = turn1["pdlaunch_kv_transfer_bytes_total"] - before["pdlaunch_kv_transfer_bytes_total"]
        assert turn1["pdlaunch_decode_prefix_hit_tokens_total"] == before["pdlaunch_decode_prefix_hit_tokens_total"]
        assert moved1 > 0 and moved1 % 6 == 0, "turn 1 loads all 6 prompt blocks from the prefill"
        block_bytes = moved1 / 6

        while not set(prompt_block_hashes(TURN1, BS)) <= cached:  # the decode announces what it loaded
            event = KV_EVENT.validate_json(next(lines))
            cached = cached | set(event.hashes) if event.type == "stored" else cached - set(event.hashes)

    computed_before = _stats(prefill)["stats"]["prompt_tokens_computed"]
    turn2_checks = {url: _metrics(url)["pdlaunch_kv_integrity_checks_total"] for url in (prefill, decode)}
    turn2_prompt = TURN1 + answer1 + NEW_MESSAGE
    answer2 = _complete(serve, turn2_prompt)
    turn2 = _metrics(decode)
    assert turn2["pdlaunch_decode_prefix_hit_tokens_total"] - turn1["pdlaunch_decode_prefix_hit_tokens_total"] == 56
    moved2 = turn2["pdlaunch_kv_transfer_bytes_total"] - turn1["pdlaunch_kv_transfer_bytes_total"]
    assert moved2 == 3 * block_bytes, "turn 2 moves blocks 7..9 only: the decode holds blocks 0..6"
    # The prefill's own prefix cache holds turn 1's 5 full prompt blocks (40 tokens): it computes 77 - 40.
    assert _stats(prefill)["stats"]["prompt_tokens_computed"] - computed_before == len(turn2_prompt) - 40

    with LLM("tiny", device="cpu", block_size=BS, num_gpu_blocks=256) as colocated:
        greedy = SamplingParams(max_tokens=ANSWER, temperature=0.0, ignore_eos=True)
        assert colocated.generate([TURN1], greedy)[0].token_ids == answer1
        assert colocated.generate([turn2_prompt], greedy)[0].token_ids == answer2

    for url in (prefill, decode):  # every block came back (held KV freed, nothing leaked)
        wait_for(lambda url=url: _stats(url)["num_blocks_used"] == 0, f"{url} to free its blocks", 30)
    # ... and the bookkeeping of both agrees: each ran an integrity check once turn 2 had started (a request added
    # makes one due: after 0.2 s idle, at most every 5 s, server/idle_check.py), and no check failed
    for url in (prefill, decode):
        wait_for(lambda url=url: _metrics(url)["pdlaunch_kv_integrity_checks_total"]
                 > turn2_checks[url], f"{url}'s integrity check after turn 2", 60)
        assert _metrics(url)["pdlaunch_kv_integrity_failures_total"] == 0
    decode_log = (serve.log_dir / "decode-0.log").read_text(errors="replace")
    assert "integrity check failed" not in decode_log
