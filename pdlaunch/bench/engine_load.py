"""What the engines did during one rate of `bench compare`: utilisation, prefill throughput, decode step times.

Read from every instance's `pdlaunch_engine_step{s,_seconds,_tokens}_total{kind}` counters
(metrics/engine_steps.py) before and after the rate. Utilisation is the share of wall time the engine spent in
steps: for PD, prefill = the prefill instances' steps, decode = the decode instances'; for colocated instances,
prefill = their steps with prompt tokens (decodes ride along in them), decode = their decode-only steps. With the
proxy's URL also its `pdlaunch_proxy_disaggregation_decisions_total{decision}` counter
(proxy.disaggregate_min_tokens): how many requests of the rate ran PD and how many on a decode alone. Also summed
over the instances: the KV bytes that arrived over transfers (`pdlaunch_kv_transfer_bytes_total`, counted where
the KV lands) and the prompt tokens computed (`pdlaunch_prompt_tokens_computed_total`); over the instances that
stream (decode, colocated): the gaps of LONG_GAP_S or more between the tokens they streamed
(`pdlaunch_inter_token_latency_seconds`, timed where the engine hands tokens out) and the slow decode steps among
them (`pdlaunch_engine_slow_decode_steps_total`, engine/step_clock.py). Set beside the same count from the
client's per-request lists (goodput.RatePoint), it says where a stall every stream saw came from: the engines (a
prompt computed beside the decodes, a slow step) or what lies between them and the client (the proxy, the client,
the host).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from pdlaunch.errors import PdlaunchError
from pdlaunch.metrics.engine_steps import STEP_KINDS

SCRAPE_TIMEOUT_S = 10.0
KV_BYTES = "pdlaunch_kv_transfer_bytes_total"  # counted where the KV lands
PROMPT_TOKENS_COMPUTED = "pdlaunch_prompt_tokens_computed_total"
SLOW_DECODE_STEPS = "pdlaunch_engine_slow_decode_steps_total"
ITL_FAMILY = "pdlaunch_inter_token_latency_seconds"
# a histogram bucket bound of ITL_FAMILY (metrics/instance.py): 50 ms, five decode steps of an 8B model
LONG_GAP_S = 0.05
_T = TypeVar("_T")
_FAMILIES = {"pdlaunch_engine_steps": "steps", "pdlaunch_engine_step_seconds": "seconds",
             "pdlaunch_engine_step_tokens": "tokens"}


class StepTotals(BaseModel):
    """Counters of one kind of step, summed over instances."""

    steps: float = 0.0
    seconds: float = 0.0
    tokens: float = 0.0

    def minus(self, other: StepTotals) -> StepTotals:
        return StepTotals(steps=self.steps - other.steps, seconds=self.seconds - other.seconds,
                          tokens=self.tokens - other.tokens)

    def plus(self, other: StepTotals) -> StepTotals:
        return StepTotals(steps=self.steps + other.steps, seconds=self.seconds + other.seconds,
                          tokens=self.tokens + other.tokens)


class InstanceTotals(BaseModel):
    role: str
    by_kind: dict[str, StepTotals]
    kv_bytes: float = 0.0  # KV that arrived over transfers
    prompt_tokens_computed: float = 0.0
    long_token_gaps: float = 0.0  # gaps of LONG_GAP_S or more between streamed tokens
    slow_decode_steps: float = 0.0


def sum_samples(text: str, names: Iterable[str]) -> dict[str, float | None]:
    """Each sample name's values summed over one /metrics page (a federated page: over its instances); None for a
    name the page does not have. Raises ValueError for text that is not Prometheus's."""
    out: dict[str, float | None] = dict.fromkeys(names)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] = (out[sample.name] or 0.0) + float(sample.value)
    return out


def parse_instance(role: str, text: str) -> InstanceTotals:
    """One instance's counters from its /metrics page (zeros for a counter not there)."""
    totals = sum_samples(text, (KV_BYTES, PROMPT_TOKENS_COMPUTED, SLOW_DECODE_STEPS))
    return InstanceTotals(role=role, by_kind=parse_step_totals(text), kv_bytes=totals[KV_BYTES] or 0.0,
                          prompt_tokens_computed=totals[PROMPT_TOKENS_COMPUTED] or 0.0,
                          long_token_gaps=parse_long_gaps(text), slow_decode_steps=totals[SLOW_DECODE_STEPS] or 0.0)


def parse_long_gaps(text: str) -> float:
    """How many gaps between streamed tokens one /metrics page's ITL histogram holds of LONG_GAP_S or more (0 for a
    page without it). Raises ValueError for a histogram without the LONG_GAP_S bucket."""
    count: float | None = None
    within: float | None = None
    for family in text_string_to_metric_families(text):
        if family.name != ITL_FAMILY:
            continue
        for sample in family.samples:
            if sample.name == f"{ITL_FAMILY}_count":
                count = float(sample.value)
            elif sample.name == f"{ITL_FAMILY}_bucket" and float(sample.labels.get("le", "nan")) == LONG_GAP_S:
                within = float(sample.value)
    if count is None:
        return 0.0
    if within is None:
        raise ValueError(f"{ITL_FAMILY} has no {LONG_GAP_S:g} s bucket")
    return count - within


def parse_step_totals(text: str) -> dict[str, StepTotals]:
    """The step counters by kind from one /metrics page (zeros for a kind not there)."""
    totals = {kind: StepTotals() for kind in STEP_KINDS}
    for family in text_string_to_metric_families(text):
        field = _FAMILIES.get(family.name)
        if field is None:
            continue
        for sample in family.samples:
            kind = sample.labels.get("kind")
            if sample.name.endswith("_total") and kind in totals:
                setattr(totals[kind], field, float(sample.value))
    return totals


class EngineLoad(BaseModel):
    """One deployment over one rate. Utilisations in [0, 1]; None where no step of that kind ran."""

    wall_s: float
    prefill_util: float
    decode_util: float
    prefill_tokens_per_s: float | None  # prompt tokens per second of prefill steps, per instance
    decode_batch: float | None  # mean sequences per decode step
    decode_step_ms: float | None  # mean decode step time
    # requests by how the proxy ran them (pd / decode_only) under proxy.disaggregate_min_tokens, the rate's warm-up
    # requests included as in the step counters; None: not read
    decisions: dict[str, int] | None = None
    kv_bytes: float = 0.0  # KV bytes moved to the instances over the rate (warm-ups included), all instances
    prompt_tokens_computed: float = 0.0  # prompt tokens the instances computed over the rate (warm-ups included)
    long_token_gaps: float = 0.0  # gaps >= LONG_GAP_S between tokens the streaming instances handed out (warm-ups too)
    slow_decode_steps: float = 0.0  # ... and their slow decode steps (engine/step_clock.py)


def engine_load(before: list[InstanceTotals], after: list[InstanceTotals], wall_s: float) -> EngineLoad:
    """`before` and `after` list the same instances in the same order."""
    pd = any(i.role != "colocated" for i in after)
    prefill_side = [(b, a) for b, a in zip(before, after) if a.role in ("prefill", "colocated")]
    decode_side = [(b, a) for b, a in zip(before, after) if a.role in ("decode", "colocated")]

    def delta(pairs: Iterable[tuple[InstanceTotals, InstanceTotals]], kind: str) -> StepTotals:
        total = StepTotals()
        for b, a in pairs:
            total = total.plus(a.by_kind[kind].minus(b.by_kind[kind]))
        return total

    prefill_steps = delta(prefill_side, "prefill")
    decode_steps = delta(decode_side, "decode")
    wall = max(wall_s, 1e-9)
    if pd:  # a PD instance's every step counts for its role (a decode's recomputed last prompt token too)
        prefill_busy = prefill_steps.seconds + delta(prefill_side, "decode").seconds
        decode_busy = decode_steps.seconds + delta(decode_side, "prefill").seconds
    else:
        prefill_busy, decode_busy = prefill_steps.seconds, decode_steps.seconds
    return EngineLoad(
        wall_s=wall_s,
        prefill_util=prefill_busy / (wall * max(1, len(prefill_side))),
        decode_util=decode_busy / (wall * max(1, len(decode_side))),
        prefill_tokens_per_s=prefill_steps.tokens / prefill_steps.seconds if prefill_steps.seconds > 0 else None,
        decode_batch=decode_steps.tokens / decode_steps.steps if decode_steps.steps > 0 else None,
        decode_step_ms=1000.0 * decode_steps.seconds / decode_steps.steps if decode_steps.steps > 0 else None,
        kv_bytes=sum(a.kv_bytes - b.kv_bytes for b, a in zip(before, after)),
        prompt_tokens_computed=sum(a.prompt_tokens_computed - b.prompt_tokens_computed for b, a in zip(before, after)),
        long_token_gaps=sum(a.long_token_gaps - b.long_token_gaps for b, a in decode_side),
        slow_decode_steps=sum(a.slow_decode_steps - b.slow_decode_steps for b, a in decode_side),
    )


def parse_decisions(text: str) -> dict[str, int]:
    """The proxy's per-request disaggregation decisions from its /metrics page ({} when it has none)."""
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "pdlaunch_proxy_disaggregation_decisions":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and "decision" in sample.labels:
                out[sample.labels["decision"]] = int(sample.value)
    return out


class LoadProbe:
    """Reads the step counters of a deployment's instances (`(role, url)` pairs) over HTTP, and with
    `proxy_url` set the proxy's disaggregation decisions."""

    def __init__(self, instances: list[tuple[str, str]], headers: dict[str, str]) -> None:
        self.instances = instances
        self.proxy_url: str | None = None
        self._http = httpx.Client(trust_env=False, timeout=SCRAPE_TIMEOUT_S, headers=headers)
        self._before: list[InstanceTotals] = []
        self._decisions_before: dict[str, int] = {}
        self._started = 0.0

    def _get(self, url: str, whose: str = "the instance's") -> str:
        try:
            response = self._http.get(f"{url}/metrics")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise PdlaunchError(f"could not read {url}/metrics within {SCRAPE_TIMEOUT_S:g} s: {exc}",
                                hint=f"{whose} log says why") from None
        return response.text

    def _page(self, url: str, parse: Callable[[str], _T], what: str = "instance") -> _T:
        text = self._get(url, f"the {what}'s")
        try:
            return parse(text)
        except (ValueError, OverflowError) as exc:  # not Prometheus text (another server on the port), or a
            # series of another shape (a decision count of +Inf): figures read from it would mean nothing
            raise PdlaunchError(f"{url}/metrics is not the metrics page of a pdlaunch {what}: {exc}",
                                hint=f"is {url} the deployment's? the {what}'s log says what runs there") from None

    def decisions(self) -> dict[str, int]:
        return self._page(self.proxy_url, parse_decisions, "proxy") if self.proxy_url is not None else {}

    def read(self) -> list[InstanceTotals]:
        return [self._page(url, functools.partial(parse_instance, role)) for role, url in self.instances]

    def start(self) -> None:
        self._decisions_before = self.decisions()
        self._before, self._started = self.read(), time.monotonic()

    def stop(self) -> EngineLoad:
        after = self.read()
        load = engine_load(self._before, after, time.monotonic() - self._started)
        if self.proxy_url is not None:
            now = self.decisions()
            load.decisions = {k: v - self._decisions_before.get(k, 0) for k, v in now.items()}
        return load

    def close(self) -> None:
        self._http.close()
