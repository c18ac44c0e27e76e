"""`bench serve --multi-turn`'s workload for a fixed seed: every prompt of every conversation, in the order sent,
and the conversations' arrival offsets. The digests were recorded from the code that drew every turn of every
conversation before sending anything; each user message is now drawn when its turn is sent, and a seed's workload
must not change with that.

No server: `send_request` is replaced by one that answers each turn at once with an answer that depends only on
the prompt, so the order of the requests is asyncio's (conversations in turn, round by round) and every prompt is
fixed by the seed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from pdlaunch.bench import multi_turn
from pdlaunch.bench.report import RequestResult
from pdlaunch.bench.serve_config import ServeBenchConfig
from pdlaunch.bench.served_length import ServedModel
from pdlaunch.bench.workload import BenchRequest, arrival_times

DIGESTS = {
    "/v1/completions": "31f2cc9c91fe1db5e9780fc2647dbfb02c870b3814398c3446c8450996be03aa",
    "/v1/chat/completions": "548a1f1245bab271f023927fa77f5818eab1bd921b23c2a86d68079451ca26e7",
}
OFFSETS = [0.0, 0.0008752120258138422, 0.0009015651664999909]


def _config(endpoint: str, **extra: Any) -> ServeBenchConfig:
    return ServeBenchConfig(base_url="http://127.0.0.1:9", endpoint=endpoint, model="m", multi_turn=True,
                            num_conversations=3, num_turns=4, system_prompt_len=6, random_input_len=5,
                            random_output_len=2, vocab_size=1000, seed=7, request_timeout=5.0, **extra)


def _sent(monkeypatch: pytest.MonkeyPatch, cfg: ServeBenchConfig,
          on_send: Callable[[], None] = lambda: None) -> list[Any]:
    """The prompts (token ids, or chat messages) in the order the run sent them; `on_send` runs at each."""
    sent: list[Any] = []

    async def answer(client: object, cfg: object, model: str, req: BenchRequest, bench_start: float,
                     on_choice: Callable[[Mapping[str, object]], None] | None = None) -> RequestResult:
        on_send()
        sent.append(req.messages if req.messages else req.prompt)
        seen = len(req.messages) if req.messages else len(req.prompt)
        assert on_choice is not None
        on_choice({"index": 0, "text": f"a{seen}", "token_ids": [seen, seen + 1], "delta": {"content": f"a{seen}"}})
        return RequestResult(success=True, prompt_len=req.prompt_len, output_len=2, ttft=0.001, latency=0.002)

    async def model(*_: object) -> ServedModel:
        return ServedModel("m")

    monkeypatch.setattr(multi_turn, "send_request", answer)
    monkeypatch.setattr(multi_turn, "resolve_model", model)
    multi_turn.run_multi_turn(cfg, Console(quiet=True))
    return sent


@pytest.mark.parametrize("endpoint", sorted(DIGESTS))
def test_a_seed_sends_the_recorded_prompts_in_the_recorded_order(monkeypatch: pytest.MonkeyPatch,
                                                                 endpoint: str) -> None:
    sent = _sent(monkeypatch, _config(endpoint))
    assert len(sent) == 12
    text = json.dumps(sent, separators=(",", ":"))
    assert hashlib.sha256(text.encode()).hexdigest() == DIGESTS[endpoint], text[:400]


def test_a_seed_draws_the_recorded_arrival_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The offsets are drawn after every conversation's turns: the same offsets mean the same draws before them."""
    drawn: list[list[float]] = []

    def recording(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
        offsets = arrival_times(n, rate, burstiness, rng)
        drawn.append(offsets.tolist())
        return offsets

    monkeypatch.setattr(multi_turn, "arrival_times", recording)
    _sent(monkeypatch, _config("/v1/completions", request_rate=1000.0))
    assert drawn == [OFFSETS]


@pytest.mark.parametrize(("endpoint", "made"), [("/v1/completions", "_ids"), ("/v1/chat/completions", "_text")])
def test_a_user_message_is_made_when_its_turn_is_sent(monkeypatch: pytest.MonkeyPatch, endpoint: str,
                                                      made: str) -> None:
    """Not every conversation's every turn before the first request: at the n-th request, the system prompt and n
    user messages have been made (the conversations' turns follow one another here, as the fake answers at once)."""
    calls: list[int] = []
    make = getattr(multi_turn, made)

    def counting(*args: Any) -> Any:
        calls.append(1)
        return make(*args)

    monkeypatch.setattr(multi_turn, made, counting)
    made_at_send: list[int] = []
    _sent(monkeypatch, _config(endpoint), on_send=lambda: made_at_send.append(len(calls)))
    assert made_at_send == [1 + n for n in range(1, 13)]
