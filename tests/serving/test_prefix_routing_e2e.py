"""Prefix-aware routing on a real 2P2D `pdlaunch serve` (tiny model, CPU), measured with `pdlaunch bench serve
--multi-turn` (issue 31): against round robin, a proxy with --routing-policy prefix and --disaggregate-min-tokens
(a turn whose conversation the decode holds runs there alone) computes at most 40% of the prompt tokens, moves at
most 40% of the KV bytes per request, and answers sooner: TTFT p50 at most 0.6x round robin's (issue 31's bound;
the test prints the pooled figures).

Why the TTFT ratio holds on two cores: a round-robin turn's first token waits for a prefill instance to compute
what it lacks of the conversation (the two latest answers and user turns, SHAPE's comment), plus a prefill leg
and the HTTP hops of both legs; a turn the prefix policy keeps on its decode waits for that decode's running
step and one step with its 8-23 new tokens. With 224-token answers the pooled ratio measured 0.34-0.56 in six
runs and 0.32-0.61 in six under two busy loops (one above 0.6, at 0.61), on this 2-core machine while other
test suites ran on it too (load average 3-7). With 160-token answers and four rounds it measured 0.37-0.42 on a
quiet machine but 0.35-0.67 under two busy loops (two of six above 0.6); with the 96-token answers the test ran
before, 0.43-0.66. A decode-alone turn is computed on a process that is busy stepping its other streams, so when
the cores are oversubscribed it slows more than round robin's prefill leg, on an otherwise idle process: the
margin comes from what round robin recomputes, which grows with the answers. Those runs took the policies in the
same order every round (round robin first); with the order alternated (below) and four rounds, ten runs under two
or three busy loops measured 0.32-0.51 (0.32-0.48 under two), so the test asserts issue 31's 0.6x. Rerun at
3ff3e86: 0.41-0.46 in four runs with other suites on the machine (load average 6-10; the test's call 91-170 s),
0.31-0.43 in three with one busy loop besides (96-111 s).

Nine conversations in two rounds would halve the test (four runs, not eight; a run's time is its turns' answers,
decoded together whatever their count) but measured 0.22-0.47 alone and 0.46, 0.60 and 0.61 (a failure) with one
busy loop: each decode then steps four or five streams, and the decode-alone turns slow with them, while the fewer
runs leave a burst of load on one run half a policy's samples. With the conversations started at once, each turn
of a run is one burst of near-lockstep requests that the same moment's load weighs on, so the runs' turns (16 a
policy), not the conversations, are the independent samples.

So the conversations start a quarter second apart (`--request-rate 4`, regular gaps), not at once: their turns
then reach the deployment one at a time, as bench serve's docstring puts it, rather than five at once, and TTFT
measures the deployment, not the queue of a burst (a prefill instance computing two or three conversations'
~470 tokens together; a decode two or three turns); a burst of load lands on a few of a run's twenty TTFTs,
not on a whole turn's five. Measured at 3ff3e86 with other suites on the machine (load average 6-10), against
the test started at once in the same hour: 0.22 and 0.24 (at once: 0.31-0.36), and 0.37 and 0.42 with one busy
loop besides (at once: 0.34-0.48); each run ~1 s longer (the last conversation starts 1 s in).

Both policies run through a proxy process of their own with the same flags but the policy, over the same
instances, at info level (the launcher's proxy's level: a debug proxy once wrote ~30 httpcore lines a request, and on
two cores that alone raised the prefix policy's TTFT p50 from ~38 to ~52 ms). Both proxies start once; a short
warm-up run through each makes the prefill-decode pairs' NIXL handshakes and the proxies' first requests, so
round robin's first turns do not pay them. (The idle prefix proxy follows the decodes' KV events during round
robin's runs: ~0.02 of a core.) Then ROUNDS rounds of both policies, one after the other, in the order round
robin, prefix; prefix, round robin; prefix, round robin; round robin, prefix (ABBA: a load that rises or falls over
the test weighs on both policies alike), every run with its own seed (its own system prompt: no cache carried from
one run to the next). The token and byte counts are deltas of the instances' counters, summed over the rounds; the
TTFTs are pooled over the rounds, so that a burst of load from whatever else shares the two cores lands on both
policies' samples.

Each conversation's last answer is asked for 8 tokens, not 224 (`--last-answer-len`, SHAPE's comment): every prompt,
and so every count, is the same, and each run ~4 s shorter. Measured at c0f39e8c with other suites on the machine
(load average 4-6), three runs alternated with three of the test before it: the call 74-94 s against 116 s (run_s
7-13 against 12-15), TTFT ratio 0.29-0.34 against 0.26-0.33, tokens 0.07x and bytes 0.05-0.06x in both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from pdlaunch.model.demo import resolve_model_path
from tests.serving.e2e import Serve, second_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = """\
instances:
  - {role: prefill, count: 2}
  - {role: decode, count: 2}
"""
SECRET = "prefix-routing-e2e-deployment-secret"
# 5 conversations x 4 turns: a 64-token system prompt, 8 new tokens per user turn, 224-token answers (the last
# turn: 64 + 4 * 8 + 3 * 224 = 768 prompt tokens, 776 with its 8-token answer, under --max-model-len 1024). A chat
# answer runs to a few hundred tokens; the test ran 96-token answers before (TTFT ratio 0.43-0.66: too close to 0.6).
# The answers are what round robin recomputes: each turn lands on the prefill instance that did not serve the
# conversation's previous turn, which has cached the prompt of the turn before that at most, so it computes the
# two latest answers and user turns again (~470 tokens), while a decode that holds the conversation computes the
# new user turn and the last answer's partial block alone (8-23 tokens, under --disaggregate-min-tokens 48; a
# first turn's ~72 uncached tokens are above it and go PD). Longer answers cost decode steps (a run takes ~2x
# the 96-token one), paid for by starting each policy's proxy once rather than once a round, and warming up
# with short runs: the test takes about as long as before.
# The conversation count is odd on purpose: the turns arrive in about the same order every round, so with an
# even count round robin over 2 instances sends each conversation back to the instance that served its last
# turn (it caches it: a baseline as sticky as prefix routing, by accident of the count; a CI run at 4
# conversations measured round robin's bytes at 48 blocks, not ~86); with an odd count each turn goes to the
# other instance, as it would for traffic that is not in lockstep.
# The last turn's answer is asked for 8 tokens (--last-answer-len): no turn resends it and nothing here reads it, and
# its 224 tokens were a quarter of each run's time; its prompt, the tokens it computes and the KV it moves are those
# of a 224-token answer, and 8 tokens (not 1: max_tokens 1 ends at the prefill) keep its decode leg.
SHAPE = ["--num-conversations", "5", "--num-turns", "4", "--system-prompt-len", "64", "--random-input-len", "8",
         "--random-output-len", "224", "--last-answer-len", "8", "--request-rate", "4", "--burstiness", "1000"]
REQUESTS = 20
# Warm-ups, one through each proxy before the rounds: the prefill-decode pairs' NIXL handshakes and each
# proxy's first requests (its tokenizer, its connections), with short answers.
WARM_UP = ["--num-conversations", "5", "--num-turns", "2", "--system-prompt-len", "64", "--random-input-len",
           "8", "--random-output-len", "8"]
# Four rounds of both policies in ABBA order; the TTFTs pooled over them (80 a policy), so that a burst of load
# from whatever else shares the two cores lands on both policies' samples.
ROUNDS = 4
LOG_LEVEL = "info"
POLICIES = {"round_robin": ["--routing-policy", "round_robin"],
            "prefix": ["--routing-policy", "prefix", "--disaggregate-min-tokens", "48"]}


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("prefix")
    config = tmp / "pd.yaml"
    config.write_text(CONFIG)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PDLAUNCH_DEPLOYMENT_SECRET", SECRET)
        deployment = Serve(tmp, [str(config), "--model", "tiny", "--num-gpu-blocks", "512", "--max-model-len", "1024"])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


def _bench(url: str, seed: int, out: Path, shape: list[str] = SHAPE) -> dict[str, Any]:
    result = CliRunner().invoke(bench_app, ["serve", "--base-url", url, "--multi-turn", *shape, "--seed", str(seed),
                                            "--result-dir", str(out.parent), "--result-filename", out.name])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["failed"] == 0, result.output
    return dict(doc)


def _routed_by_prefix(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("pdlaunch_proxy_prefix_routed_total"))


def test_prefix_routing_computes_moves_and_waits_a_fraction_of_round_robins(serve: Serve, tmp_path: Path) -> None:
    tokenizer = ["--tokenizer", str(resolve_model_path("tiny"))]
    runs: dict[str, list[dict[str, Any]]] = {policy: [] for policy in POLICIES}
    with ExitStack() as stack:
        urls = {policy: stack.enter_context(second_proxy(serve, tmp_path / f"{policy}.log", SECRET, *flags,
                                                         *tokenizer, log_level=LOG_LEVEL))
                for policy, flags in POLICIES.items()}
        for seed, (policy, url) in enumerate(urls.items(), start=1000):
            _bench(url, seed, tmp_path / f"warm-up-{policy}.json", WARM_UP)
        routed = -_routed_by_prefix(urls["prefix"])
        for round_ in range(1, ROUNDS + 1):
            order = list(urls.items()) if round_ % 4 in (0, 1) else list(urls.items())[::-1]  # ABBA (ROUNDS' comment)
            for seed, (policy, url) in enumerate(order, start=10 * round_):
                runs[policy].append(doc := _bench(url, seed, tmp_path / f"{policy}-{round_}.json"))
                assert doc["completed"] == REQUESTS, doc
        routed += _routed_by_prefix(urls["prefix"])
    figures = {policy: {
        "prompt_tokens_computed_per_request": float(np.mean([d["multi_turn"]["prompt_tokens_computed_per_request"]
                                                             for d in docs])),
        "kv_bytes_moved_per_request": float(np.mean([d["multi_turn"]["kv_bytes_moved_per_request"] for d in docs])),
        "ttft_p50_ms": float(np.median([t for d in docs for t in d["ttfts"]]) * 1000),
        "ttft_p50_ms_per_round": [round(d["multi_turn"]["ttft_p50_ms"], 1) for d in docs],
        "run_s": [round(d["duration"], 1) for d in docs],
    } for policy, docs in runs.items()}
    round_robin, prefix = figures["round_robin"], figures["prefix"]
    print(f"\nround robin: {round_robin}\nprefix:      {prefix}\nlegs routed by prefix: {routed:.0f}")
    assert routed > 0, (tmp_path / "prefix.log").read_text()[-3000:]
    assert round_robin["prompt_tokens_computed_per_request"] > 0 and round_robin["kv_bytes_moved_per_request"] > 0
    assert prefix["prompt_tokens_computed_per_request"] <= 0.4 * round_robin["prompt_tokens_computed_per_request"]
    assert prefix["kv_bytes_moved_per_request"] <= 0.4 * round_robin["kv_bytes_moved_per_request"]
    assert prefix["ttft_p50_ms"] <= 0.6 * round_robin["ttft_p50_ms"], (round_robin, prefix)
