"""hop_overhead.py's chat turns: request i is turn i % 4 of conversation i // 4, each turn the last one's messages and
its answer plus a new user message (what the proxy's piece cache and prefix routing meet), and the fourth turn fits
the tiny model's 2,048 tokens with room for its answer."""

from __future__ import annotations

import json

import pytest

from pdlaunch.model.demo import resolve_model_path
from pdlaunch.proxy.disaggregate import PromptTokens
from tests.helpers.benchmark_scripts import BENCHMARKS, load_benchmark


def test_each_turn_extends_the_last_and_fits_the_tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    hop = load_benchmark(BENCHMARKS / "hop_overhead.py", "_bench_hop_overhead_turns", monkeypatch)
    tokens = PromptTokens(resolve_model_path("tiny"))
    bodies = [json.loads(hop.request_body("chat turns", True, 1, i)) for i in range(2 * hop.TURNS)]
    for i, body in enumerate(bodies):
        messages = body["messages"]
        assert messages[0] == bodies[0]["messages"][0]  # the system message every conversation shares
        turn = i % hop.TURNS
        assert len(messages) == 2 * turn + 2 and messages[-1]["role"] == "user"
        if turn:
            assert messages[:-2] == bodies[i - 1]["messages"] and messages[-2]["role"] == "assistant"
        else:
            assert i == 0 or messages[1] != bodies[i - hop.TURNS]["messages"][1]  # a new conversation
        assert len(tokens.ids_now(body, chat=True)) < int(hop.PREFIX_FLAGS[-1]) - 1  # decode only, room for one token
