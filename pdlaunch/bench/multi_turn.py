"""`pdlaunch bench serve --multi-turn`: C conversations x T turns of chat traffic.

Every conversation starts with the same system prompt (`--system-prompt-len` tokens, or words for chat);
turn t sends the whole conversation so far: the system prompt, each earlier turn's user message and
answer, then a new user message (`--random-input-len`), and asks for `--random-output-len` tokens (the last
turn `--last-answer-len` when given: no turn resends that answer, so a run that measures TTFT and the prompt
work can ask few tokens of it and end sooner). Over
/v1/completions the answer is taken as the server's own token ids (`return_token_ids`), so each prompt
extends the previous one token for token, as a chat client's resend does; over /v1/chat/completions it is
the answer's text, as an assistant message. Each turn is sent when the previous one's answer is complete;
a failed turn ends its conversation (the next prompt would not extend what the server has seen). A user
message is drawn when its turn is sent, so the run holds the conversations so far, not every turn of all of
them (a seed gives the messages that drawing them all before the run gave). The C conversations start at
once, or with `--request-rate R` at R conversations per second (gamma gaps of `--burstiness`, as independent
prompts arrive): started together, conversations turn in near lockstep, so every turn's prompts reach the
deployment in one burst and TTFT measures that burst's queue as much as the deployment.

Besides the usual latencies (report.py, TTFT p50 among them), the run reads the deployment's `/metrics`
before and after (pdlaunch's proxy serves every instance's series) and reports per request:
- prompt tokens computed: `pdlaunch_prompt_tokens_computed_total` over all instances (what no prefix cache
  and no KV transfer supplied, prefill and decode instances alike);
- KV bytes moved: `pdlaunch_kv_transfer_bytes_total` over all instances.
Both are None for a server that does not export them (vLLM), and when either read failed. Nothing else may use
the deployment meanwhile.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
import numpy as np
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pdlaunch.bench.engine_load import KV_BYTES, PROMPT_TOKENS_COMPUTED, sum_samples
from pdlaunch.bench.openai_client import CONNECT_TIMEOUT_S, resolve_model, send_request
from pdlaunch.bench.report import (
    RequestResult,
    ServeDoc,
    calculate_metrics,
    parse_goodput,
    print_report,
    result_dict,
)
from pdlaunch.bench.serve import frozen_heap, prepare_outputs, save_result
from pdlaunch.bench.serve_config import MIN_TOKEN_ID, ServeBenchConfig
from pdlaunch.bench.served_length import check_fits_served
from pdlaunch.bench.workload import BenchRequest, arrival_times
from pdlaunch.bench.workload_size import check_workload_fits
from pdlaunch.errors import PdlaunchError

COUNTERS = {"prompt_tokens_computed": PROMPT_TOKENS_COMPUTED, "kv_bytes_moved": KV_BYTES}
_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


class MultiTurnSummary(BaseModel):
    """Per-request figures of one multi-turn run (the JSON's `multi_turn`)."""

    conversations: int
    turns: int
    requests: int  # answered
    prompt_tokens_computed_per_request: float | None
    kv_bytes_moved_per_request: float | None
    ttft_p50_ms: float


def _draw_words(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, len(_WORDS), size=n)


def _draw_ids(rng: np.random.Generator, cfg: ServeBenchConfig, n: int) -> np.ndarray:
    return rng.integers(MIN_TOKEN_ID, cfg.vocab_size, size=n)


def _text(rng: np.random.Generator, n: int) -> str:
    return " ".join(_WORDS[i] for i in _draw_words(rng, n).tolist())


def _ids(rng: np.random.Generator, cfg: ServeBenchConfig, n: int) -> list[int]:
    return [int(t) for t in _draw_ids(rng, cfg, n).tolist()]


def _user_turns(cfg: ServeBenchConfig, rng: np.random.Generator) -> np.random.Generator:
    """A copy of `rng` at the first of one conversation's user messages, from which the conversation draws them
    turn by turn; `rng` moves past all of them, drawn and dropped. In the seeded stream a conversation's T
    token-id messages come first, then its T word messages (the order of drawing them all before the run):
    completions send the first, chat the second."""
    ids_at = copy.deepcopy(rng)
    for _ in range(cfg.num_turns):
        _draw_ids(rng, cfg, cfg.random_input_len)
    words_at = copy.deepcopy(rng)
    for _ in range(cfg.num_turns):
        _draw_words(rng, cfg.random_input_len)
    return words_at if cfg.is_chat else ids_at


@dataclass
class _Answer:
    """One turn's answer as its stream brings it: token ids (when asked for) and text."""

    ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def keep(self, choice: Mapping[str, object]) -> None:
        ids, text, delta = choice.get("token_ids"), choice.get("text"), choice.get("delta")
        if isinstance(delta, Mapping):
            text = delta.get("content")
        if ids is not None:
            # The next turn resends these as the server's own tokens: an id dropped or made up here would make
            # every later prompt of the conversation diverge from what the server has cached.
            if not (isinstance(ids, list) and all(type(i) is int and i >= 0 for i in ids)):
                raise ValueError(f"the answer's token_ids {json.dumps(ids)[:80]} are not token ids (integers >= 0)")
            self.ids.extend(ids)
        if isinstance(text, str):
            self.text.append(text)


class _Conversation:
    """One conversation's history and its turns' results."""

    def __init__(self, cfg: ServeBenchConfig, user_turns: np.random.Generator, system_ids: list[int],
                 system_text: str) -> None:
        self.cfg = cfg
        self.user_turns = user_turns  # _user_turns: the next turn's user message is its next draw
        self.ids = list(system_ids)
        self.messages = [{"role": "system", "content": system_text}] if system_text else []
        self.results: list[RequestResult] = []

    def next_request(self, turn: int) -> BenchRequest:
        """Turn `turn` (0-based): the conversation so far and a new user message."""
        out, user_len = self.cfg.answer_len(turn), self.cfg.random_input_len
        if self.cfg.is_chat:
            self.messages.append({"role": "user", "content": _text(self.user_turns, user_len)})
            return BenchRequest(prompt="", prompt_len=sum(len(m["content"].split()) for m in self.messages),
                                output_len=out, messages=list(self.messages))
        self.ids += _ids(self.user_turns, self.cfg, user_len)
        return BenchRequest(prompt=list(self.ids), prompt_len=len(self.ids), output_len=out, return_token_ids=True)

    async def run(self, client: httpx.AsyncClient, model: str, start: float, offset: float) -> None:
        """The turns, the first `offset` seconds after `start` (the conversation's arrival time); after a failed
        turn, the turns not sent count as failed requests."""
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        for turn in range(self.cfg.num_turns):
            answer = _Answer()
            result = await send_request(client, self.cfg, model, self.next_request(turn), start, answer.keep)
            self.results.append(result)
            if result.success and not self.cfg.is_chat and not answer.ids:
                result.success = False
                result.error = ("the answer carried no token_ids: --multi-turn over /v1/completions needs "
                                "return_token_ids (pdlaunch, vLLM >= 0.10.2); try --endpoint /v1/chat/completions")
            if not result.success:
                self.results += [RequestResult(start=result.start, error=f"not sent: the conversation stopped at "
                                               f"turn {turn + 1} of {self.cfg.num_turns}, which failed")
                                 for _ in range(turn + 1, self.cfg.num_turns)]
                return
            if self.cfg.is_chat:
                self.messages.append({"role": "assistant", "content": "".join(answer.text)})
            else:
                self.ids += answer.ids


async def _counters(client: httpx.AsyncClient, cfg: ServeBenchConfig) -> dict[str, float | None] | None:
    """The deployment's COUNTERS summed over every instance (a counter None: not on the page, as a labelled one is
    until it first counts); None when /metrics could not be read (no answer, not 200, not Prometheus text)."""
    try:
        response = await client.get(cfg.base_url.rstrip("/").removesuffix("/v1") + "/metrics", timeout=30.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        sums = sum_samples(response.text, COUNTERS.values())
    except ValueError:  # not Prometheus text (a gateway's page): nothing exported
        return None
    return {key: sums[name] for key, name in COUNTERS.items()}


async def _bench(cfg: ServeBenchConfig, console: Console) -> tuple[list[_Conversation], float, str,
                                                                  dict[str, float | None] | None]:
    """The conversations run, the run's duration, the model, and the COUNTERS' deltas over the run (None: /metrics
    could not be read before or after it)."""
    limits = httpx.Limits(max_connections=cfg.num_conversations + 1)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(cfg.request_timeout, connect=CONNECT_TIMEOUT_S),
                                 headers=cfg.headers) as client:
        served = await resolve_model(client, cfg)  # before the workload is drawn: a wrong --base-url fails at once
        check_fits_served(cfg, served)
        model = served.name
        rng = np.random.default_rng(cfg.seed)
        system_ids, system_text = _ids(rng, cfg, cfg.system_prompt_len), _text(rng, cfg.system_prompt_len)
        conversations = [_Conversation(cfg, _user_turns(cfg, rng), system_ids, system_text)
                         for _ in range(cfg.num_conversations)]
        offsets = arrival_times(cfg.num_conversations, cfg.request_rate, cfg.burstiness, rng)  # after the content
        last = "" if cfg.last_answer_len is None else f" ({cfg.last_answer_len} for the last)"
        starts = "all at once" if math.isinf(cfg.request_rate) else f"{cfg.request_rate:g} started per second"
        console.print(f"{cfg.num_conversations} conversations x {cfg.num_turns} turns to {escape(cfg.url)} "
                      f"(model {escape(model)}): "
                      f"system prompt {cfg.system_prompt_len}, +{cfg.random_input_len} per user turn, "
                      f"{cfg.random_output_len} per answer{last}, {starts}")
        before = await _counters(client, cfg)
        start = time.perf_counter()
        with frozen_heap():
            await asyncio.gather(*(c.run(client, model, start, float(o)) for c, o in zip(conversations, offsets)))
        duration = time.perf_counter() - start
        after = await _counters(client, cfg)
    # None unless both pages were read: the page after alone counts everything since the deployment started
    delta: dict[str, float | None] | None = None
    if before is not None and after is not None:
        delta = {k: None if (total := after[k]) is None else total - (before[k] or 0.0) for k in COUNTERS}
    return conversations, duration, model, delta


def run_multi_turn(cfg: ServeBenchConfig, console: Console) -> ServeDoc:
    """Run the conversations, print the report and the per-request figures; returns the JSON document."""
    if cfg.is_chat and cfg.prompt_format == "ids":
        raise PdlaunchError("--multi-turn over chat sends words", field="--prompt-format", hint="drop --prompt-format")
    goodput_ms = parse_goodput(cfg.goodput)
    prepare_outputs(cfg)
    check_workload_fits(cfg)
    conversations, duration, model, delta = asyncio.run(_bench(cfg, console))
    results = [r for c in conversations for r in c.results]
    metrics = calculate_metrics(results, duration, goodput_ms)
    answered = metrics.completed

    def per_request(key: str) -> float | None:
        value = None if delta is None else delta[key]
        return value / answered if value is not None and answered else None

    summary = MultiTurnSummary(conversations=cfg.num_conversations, turns=cfg.num_turns, requests=answered,
                               prompt_tokens_computed_per_request=per_request("prompt_tokens_computed"),
                               kv_bytes_moved_per_request=per_request("kv_bytes_moved"),
                               ttft_p50_ms=metrics.latency_ms["ttft"].median)
    print_report(console, metrics, results, goodput_ms)
    table = Table(title="Multi-turn, per request", show_header=False, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in (("Prompt tokens computed", summary.prompt_tokens_computed_per_request),
                        ("KV bytes moved", summary.kv_bytes_moved_per_request)):
        missing = "n/a (/metrics could not be read)" if delta is None else "n/a (not exported)"
        table.add_row(name, missing if value is None else f"{value:,.1f}")
    table.add_row("TTFT p50 (ms)", f"{summary.ttft_p50_ms:.2f}")
    console.print(table)
    doc = result_dict(metrics, results, {
        "backend": "openai-chat" if cfg.is_chat else "openai", "base_url": cfg.base_url, "endpoint": cfg.endpoint,
        "model_id": model, "system_prompt_len": cfg.system_prompt_len, "user_turn_len": cfg.random_input_len,
        "answer_len": cfg.random_output_len, "seed": cfg.seed, "goodput_slos_ms": {**goodput_ms},
        "conversation_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness,
        **({} if cfg.last_answer_len is None else {"last_answer_len": cfg.last_answer_len}),
        "multi_turn": summary.model_dump()})
    if cfg.save_result or cfg.result_filename:
        name = cfg.result_filename or f"pdlaunch-multi-turn-{model.replace('/', '_')}-{doc['date']}.json"
        path = cfg.result_dir / name
        save_result(cfg, doc, path)
        console.print(f"Saved results to {path}", markup=False)
    if not answered:
        raise PdlaunchError(f"every turn failed; first error: {results[0].error if results else 'none sent'}",
                            hint="check --base-url, --endpoint, --model and the server log")
    return doc
