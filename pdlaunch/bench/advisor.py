"""The P:D advisor of `pdlaunch bench compare`: which xPyD split of N GPUs serves a workload with the most goodput.

From what the PD run measured, per GPU:
- prefill throughput P (prompt tokens per second of prefill steps): one prefill GPU finishes mu = P / input_len
  requests per second, each in S = input_len / P seconds of prefill;
- decode step time t(b) = a + c * b ms against batch b (least squares over the rates; one batch size measured:
  t constant), so the decode capacity at the TPOT target T is B = (T - a) / c sequences (at most max_num_seqs);
  a sequence stays output_len steps of about T ms, so one decode GPU finishes B / (output_len * T / 1000)
  requests per second.

A split xPyD *sustains* min(x * mu, y * decode req/s): its throughput bound. Goodput is less before that: with a
TTFT target, a prompt waits behind the prompts queued at its prefill. Each prefill GPU is taken as an M/M/1
queue fed rate lam = r / x of the offered rate r (Poisson arrivals, round robin), so a prompt's wait exceeds w
with probability rho * exp(-(mu - lam) * w), rho = lam / mu, and its TTFT (wait + S) is within the target
TTFT_t with probability

    within(r) = 1 - rho * exp(-(mu - lam) * (TTFT_t - S))     (0 when S > TTFT_t or rho >= 1).

Exponential service overstates the wait of equal-length prompts (M/D/1 waits half as long on average); the
difference covers what the model leaves out (a prompt that arrives mid-step waits for the step, the KV
transfer, the decode's first step). The predicted goodput at r is within(r) * min(r, y * decode req/s), and a
split's *SLO rate* is the highest r it serves with >= 90% of requests within the TTFT target
(goodput.WITHIN_SLO_SHARE, the criterion `bench compare` reports). The advice is the split with the highest
SLO rate (ties: more prefill GPUs); without a TTFT target, the highest sustained rate. Still left out: a KV
cache too small for B sequences; `bench compare` runs the advised split so the prediction is checked.

No split meets the SLOs when a batch-1 decode step is over the TPOT target (B = 0) or one prompt's prefill S
is over the TTFT target: every SLO rate is 0. The advice then names the target missed and by how much
(`Advice.unmet`), ranks the splits by sustained rate for information only, and `bench compare` runs none.

A decode (or colocated) instance that computes prompt tokens beside its streams stretches their step: a chunk of
c tokens adds about c / P seconds (the prefill's rate; attention over a long prompt's earlier chunks adds a
little more). So the streams stay within the TPOT target T with at most

    c = (T - t(b)) * P / 1000     prompt tokens a step beside b decodes

(`Advice.prompt_token_cap`, at the largest batch the PD run's decode measured): a bound on
`scheduler.prompt_tokens_while_decoding` where prompts run on decodes (per-request disaggregation's spilled
prompts) or colocated, by the GPU's time alone. A step with prompt chunks also pays host work (its attention runs
eagerly between piecewise graphs) that this leaves out: set as the cap on 2x H200, its 360 tokens left a colocated
pair's prompts queued for seconds (benchmarks/RESULTS.md, fifty-first session), so measure a value before using it
(`bench compare --config`).

That steady-state queue is the long run a deployment serves in; a `bench compare` rate is a few seconds of it,
over which the queue never settles (at 24 req/s of a 64/3072-token mix the model read 1.6 req/s of goodput for
1P1D, the run measured 13.1). So where the PD run's per-request lists are at hand, the goodput predicted for
each rate *of this workload* replays it instead (`Workload`, `Advice.predicted_goodput`): the PD run's own
arrivals and prompt lengths, each prompt sent to the split's prefill GPU that frees first and computed there in
length / P seconds after the ones before it, its TTFT that plus the PD run's median of measured TTFT less that
same replay on the PD split (the KV transfer, the decode's first step, the hops); within the TTFT target or not;
the goodput those within over the run's end (last arrival + its TTFT + output_len - 1 decode steps at the PD
run's mean step time), scaled by the decode GPUs' share of the offered rate they finish. Checked against six
1P1D runs of that mix at 24 req/s (RESULTS.md forty-seventh session): 12.4-14.3 predicted, 11.9-14.2 measured
(the overhead taken from the same runs: a median, it does not fit which requests queue past the target).
"""

from __future__ import annotations

import heapq
import math
import statistics

from pydantic import BaseModel, Field

from pdlaunch.bench.goodput import WITHIN_SLO_SHARE

MS_PER_S = 1000.0


class DecodePoint(BaseModel):
    """A decode instance at one rate: its mean batch and mean step time."""

    batch: float = Field(gt=0)
    step_ms: float = Field(gt=0)


class DecodeFit(BaseModel):
    """t(b) = intercept_ms + slope_ms * b."""

    intercept_ms: float
    slope_ms: float

    def step_ms(self, batch: float) -> float:
        return self.intercept_ms + self.slope_ms * batch


def fit_decode(points: list[DecodePoint]) -> DecodeFit:
    """Least squares over the points; a single batch size (or a falling line, which is noise) gives a flat t."""
    if not points:
        raise ValueError("no decode step was measured")
    n = len(points)
    mean_b = sum(p.batch for p in points) / n
    mean_t = sum(p.step_ms for p in points) / n
    var_b = sum((p.batch - mean_b) ** 2 for p in points)
    if var_b < 1e-9:
        return DecodeFit(intercept_ms=mean_t, slope_ms=0.0)
    slope = sum((p.batch - mean_b) * (p.step_ms - mean_t) for p in points) / var_b
    if slope <= 0:
        return DecodeFit(intercept_ms=mean_t, slope_ms=0.0)
    return DecodeFit(intercept_ms=mean_t - slope * mean_b, slope_ms=slope)


def decode_capacity(fit: DecodeFit, tpot_ms: float, max_num_seqs: int) -> float:
    """Sequences one decode GPU runs at once with its step time within `tpot_ms` (0 when even one misses)."""
    if fit.step_ms(1.0) > tpot_ms:
        return 0.0
    if fit.slope_ms <= 0:
        return float(max_num_seqs)
    return min(float(max_num_seqs), (tpot_ms - fit.intercept_ms) / fit.slope_ms)


def within_ttft(lam: float, mu: float, ttft_s: float) -> float:
    """Share of prompts whose TTFT (queue wait + 1 / mu of prefill) is within `ttft_s` at one prefill GPU fed
    `lam` requests/s that it finishes at `mu` requests/s (M/M/1; module doc)."""
    if mu <= 0 or lam >= mu:
        return 0.0
    slack = ttft_s - 1.0 / mu
    if slack < 0:
        return 0.0
    return max(0.0, 1.0 - (lam / mu) * math.exp(-(mu - lam) * slack))


class SplitPrediction(BaseModel):
    prefill: int
    decode: int
    prefill_rate: float  # requests/s the prefill GPUs finish
    decode_rate: float  # requests/s the decode GPUs finish within the TPOT target
    sustained_rate: float  # min of the two
    ttft_target_ms: float | None = None  # None: no TTFT queueing in the prediction
    slo_rate: float = 0.0  # the highest rate with >= WITHIN_SLO_SHARE within the TTFT target (sustained without)

    @property
    def label(self) -> str:
        return f"{self.prefill}P{self.decode}D"

    def within(self, rate: float) -> float:
        """Predicted share of requests within the TTFT target at offered `rate` (1 without a target)."""
        if self.ttft_target_ms is None:
            return 1.0
        mu = self.prefill_rate / self.prefill
        return within_ttft(rate / self.prefill, mu, self.ttft_target_ms / MS_PER_S)

    def goodput(self, rate: float) -> float:
        """Predicted goodput at offered `rate`, requests/s."""
        if self.ttft_target_ms is None:
            return min(rate, self.sustained_rate)
        return self.within(rate) * min(rate, self.decode_rate)


def _slo_rate(split: SplitPrediction) -> float:
    """The highest rate `split` serves with >= WITHIN_SLO_SHARE within its TTFT target, by bisection (the share
    falls as the rate rises)."""
    top = min(split.prefill_rate, split.decode_rate)
    if split.ttft_target_ms is None or top <= 0:
        return top
    if split.within(1e-9 * top) < WITHIN_SLO_SHARE:
        return 0.0
    lo, hi = 0.0, top
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if split.within(mid) >= WITHIN_SLO_SHARE else (lo, mid)
    return lo


class Workload(BaseModel):
    """One rate of the PD run, as the replay needs it (module doc)."""

    rate: float
    arrivals_s: list[float]  # each request's send time after the first's
    prompt_lens: list[int]
    ttft_overhead_s: float  # TTFT beyond the replayed prefill wait and compute, the PD run's median
    decode_step_ms: float  # the PD run's mean decode step at this rate


def prefill_times(arrivals_s: list[float], prompt_lens: list[int], prefill_gpus: int,
                  tokens_per_s: float) -> list[float]:
    """Per request (in the given order): seconds from its arrival until its prompt is computed, each prompt in
    arrival order on the prefill GPU that frees first, `tokens_per_s` per GPU."""
    if prefill_gpus < 1 or tokens_per_s <= 0 or len(arrivals_s) != len(prompt_lens):
        raise ValueError("a replay needs prefill GPUs, a prefill rate, and a length per arrival")
    free = [0.0] * prefill_gpus
    out = [0.0] * len(arrivals_s)
    for i in sorted(range(len(arrivals_s)), key=lambda k: arrivals_s[k]):
        start = max(arrivals_s[i], heapq.heappop(free))
        done = start + prompt_lens[i] / tokens_per_s
        heapq.heappush(free, done)
        out[i] = done - arrivals_s[i]
    return out


def workload(rate: float, arrivals_s: list[float], prompt_lens: list[int], ttfts_s: list[float],
             prefill_gpus: int, tokens_per_s: float, decode_step_ms: float) -> Workload:
    """A rate of the PD run (`prefill_gpus` prefill GPUs) as a Workload: its overhead is the median of measured TTFT
    less the replayed prefill time of the same requests."""
    replayed = prefill_times(arrivals_s, prompt_lens, prefill_gpus, tokens_per_s)
    overhead = statistics.median(t - r for t, r in zip(ttfts_s, replayed)) if replayed else 0.0
    return Workload(rate=rate, arrivals_s=arrivals_s, prompt_lens=prompt_lens, ttft_overhead_s=max(0.0, overhead),
                    decode_step_ms=decode_step_ms)


class Advice(BaseModel):
    num_gpus: int
    input_len: int
    output_len: int
    tpot_target_ms: float
    prefill_tokens_per_s: float  # per prefill GPU
    decode_fit: DecodeFit
    decode_sequences: float  # per decode GPU at the TPOT target
    splits: list[SplitPrediction]  # every xPyD with x + y = num_gpus
    best: SplitPrediction
    workloads: list[Workload] = []  # the PD run's rates, replayed for the per-rate prediction (module doc)
    cap_batch: float = 0.0  # the largest decode batch measured: where prompt_token_cap is taken
    # why no split meets the SLOs (the target missed and by how much); then `best` is the highest sustained rate,
    # for information only, and `bench compare` runs no advised split
    unmet: str | None = None

    def prompt_token_cap(self, batch: float | None = None) -> int:
        """Prompt tokens a step may carry beside `batch` decodes (default: the largest batch measured) and still end
        within the TPOT target (module doc); 0 when the decodes alone already take it."""
        step = self.decode_fit.step_ms(self.cap_batch if batch is None else batch)
        return max(0, math.floor((self.tpot_target_ms - step) * self.prefill_tokens_per_s / MS_PER_S))

    def predicted_goodput(self, rate: float) -> float:
        """The best split's goodput at `rate`: this workload replayed when the PD run measured that rate, else the
        steady-state queue's."""
        w = next((w for w in self.workloads if w.rate == rate), None)
        b = self.best
        if w is None or b.ttft_target_ms is None or not w.arrivals_s:
            return b.goodput(rate)
        ttfts = [t + w.ttft_overhead_s for t in prefill_times(w.arrivals_s, w.prompt_lens, b.prefill,
                                                              self.prefill_tokens_per_s)]
        within = sum(1 for t in ttfts if t * MS_PER_S <= b.ttft_target_ms)
        end = max(a + t for a, t in zip(w.arrivals_s, ttfts)) + (self.output_len - 1) * w.decode_step_ms / MS_PER_S
        return within / end * min(1.0, b.decode_rate / rate) if end > 0 else 0.0

    def sentence(self) -> str:
        b = self.best
        if self.unmet is not None:
            ranked = sorted(self.splits, key=lambda s: (-s.sustained_rate, -s.prefill))
            rates = (f"splits by the rate they sustain within TPOT {self.tpot_target_ms:g} ms, for information: "
                     + ", ".join(f"{s.label} {s.sustained_rate:.2f}" for s in ranked) + " req/s"
                     if b.sustained_rate > 0 else
                     f"every split sustains 0 req/s within TPOT {self.tpot_target_ms:g} ms")
            return (f"advice for {self.num_gpus} GPUs: no split meets the SLOs: {self.unmet}; {rates} (prefill "
                    f"{self.prefill_tokens_per_s:.0f} tokens/s per GPU, decode {self.decode_sequences:.0f} sequences "
                    f"per GPU at TPOT {self.tpot_target_ms:g} ms)")
        limit = "prefill" if b.prefill_rate < b.decode_rate else "decode"
        within = (f"to keep {WITHIN_SLO_SHARE:.0%} of requests within TTFT {b.ttft_target_ms:g} ms up to "
                  f"{b.slo_rate:.2f} req/s and " if b.ttft_target_ms is not None else "")
        return (f"advice for {self.num_gpus} GPUs: {b.label}, predicted {within}to sustain {b.sustained_rate:.2f} "
                f"req/s ({limit}-bound; prefill {self.prefill_tokens_per_s:.0f} tokens/s per GPU, decode "
                f"{self.decode_sequences:.0f} sequences per GPU at TPOT {self.tpot_target_ms:g} ms)")


def _ms(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def unmet_targets(fit: DecodeFit, tpot_target_ms: float, input_len: int, prefill_tokens_per_s: float,
                  ttft_target_ms: float | None) -> str | None:
    """Which target no split can meet, and by how much: a batch-1 decode step over the TPOT target, one prompt's
    prefill over the TTFT target; None when neither is missed."""
    missed = []
    step = fit.step_ms(1.0)
    if step > tpot_target_ms:
        missed.append(f"a batch-1 decode step takes {_ms(step)} ms, {_ms(step - tpot_target_ms)} ms over the TPOT "
                      f"target of {tpot_target_ms:g} ms")
    prefill_ms = input_len / prefill_tokens_per_s * MS_PER_S
    if ttft_target_ms is not None and prefill_ms > ttft_target_ms:
        missed.append(f"one {input_len}-token prompt's prefill takes {prefill_ms:.0f} ms at "
                      f"{prefill_tokens_per_s:.0f} tokens/s, {prefill_ms - ttft_target_ms:.0f} ms over the TTFT "
                      f"target of {ttft_target_ms:g} ms")
    return ", and ".join(missed) or None


def advise(num_gpus: int, input_len: int, output_len: int, tpot_target_ms: float, prefill_tokens_per_s: float,
           decode_points: list[DecodePoint], max_num_seqs: int, ttft_target_ms: float | None = None) -> Advice:
    """The xPyD split of `num_gpus` (>= 2) with the highest SLO rate: within the TPOT target and, given
    `ttft_target_ms`, with >= 90% of requests within it (module doc)."""
    if num_gpus < 2:
        raise ValueError(f"a PD split needs at least 2 GPUs, got {num_gpus}")
    if prefill_tokens_per_s <= 0 or input_len < 1:
        raise ValueError(f"advice needs a prefill rate and a prompt length, got {prefill_tokens_per_s} tokens/s and "
                         f"{input_len} tokens")
    fit = fit_decode(decode_points)
    sequences = decode_capacity(fit, tpot_target_ms, max_num_seqs)
    per_prefill = prefill_tokens_per_s / input_len
    # a sequence holds its slot for output_len steps of (at most) the TPOT target
    per_decode = sequences / (output_len * max(fit.step_ms(sequences), 1e-9) / MS_PER_S) if sequences > 0 else 0.0
    splits = [
        SplitPrediction(prefill=x, decode=num_gpus - x, prefill_rate=x * per_prefill,
                        decode_rate=(num_gpus - x) * per_decode,
                        sustained_rate=min(x * per_prefill, (num_gpus - x) * per_decode), ttft_target_ms=ttft_target_ms)
        for x in range(1, num_gpus)
    ]
    for split in splits:
        split.slo_rate = _slo_rate(split)
    unmet = None
    if all(round(s.slo_rate, 9) <= 0 for s in splits):  # every SLO rate ties at 0: no split to advise
        unmet = unmet_targets(fit, tpot_target_ms, input_len, prefill_tokens_per_s, ttft_target_ms) or \
            f"no split keeps {WITHIN_SLO_SHARE:.0%} of requests within the SLOs at any rate"
        best = max(splits, key=lambda s: (round(s.sustained_rate, 9), s.prefill))
    else:
        best = max(splits, key=lambda s: (round(s.slo_rate, 9), s.prefill))
    return Advice(num_gpus=num_gpus, input_len=input_len, output_len=output_len, tpot_target_ms=tpot_target_ms,
                  prefill_tokens_per_s=prefill_tokens_per_s, decode_fit=fit, decode_sequences=sequences,
                  splits=splits, best=best, cap_batch=max(p.batch for p in decode_points), unmet=unmet)
