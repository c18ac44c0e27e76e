"""The P:D advisor of `pdlaunch bench compare`: which xPyD split of N GPUs serves a workload with the most goodput.

From what the PD run measured, per GPU:
- prefill throughput P (prompt tokens per second of prefill steps): one prefill GPU finishes P / input_len
  requests per second;
- decode step time t(b) = a + c * b ms against batch b (least squares over the rates; one batch size measured:
  t constant), so the decode capacity at the TPOT target T is B = (T - a) / c sequences (at most max_num_seqs);
  a sequence stays output_len steps of about T ms, so one decode GPU finishes B / (output_len * T / 1000)
  requests per second.

A split xPyD sustains min(x * prefill req/s, y * decode req/s); its predicted goodput at offered rate r is
min(r, that). The advice is the split with the highest sustained rate (ties: more prefill GPUs, since TTFT has
no slack once prefill queues). What it leaves out: TTFT queueing near saturation, KV transfer time, and a KV
cache too small for B sequences; `bench compare` runs the advised split so the prediction is checked.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

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


class SplitPrediction(BaseModel):
    prefill: int
    decode: int
    prefill_rate: float  # requests/s the prefill GPUs finish
    decode_rate: float  # requests/s the decode GPUs finish within the TPOT target
    sustained_rate: float  # min of the two

    @property
    def label(self) -> str:
        return f"{self.prefill}P{self.decode}D"

    def goodput(self, rate: float) -> float:
        """Predicted goodput at offered `rate`, requests/s."""
        return min(rate, self.sustained_rate)


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

    def sentence(self) -> str:
        b = self.best
        limit = "prefill" if b.prefill_rate < b.decode_rate else "decode"
        return (f"advice for {self.num_gpus} GPUs: {b.label}, predicted to sustain {b.sustained_rate:.2f} req/s "
                f"({limit}-bound; prefill {self.prefill_tokens_per_s:.0f} tokens/s per GPU, decode "
                f"{self.decode_sequences:.0f} sequences per GPU at TPOT {self.tpot_target_ms:g} ms)")


def advise(num_gpus: int, input_len: int, output_len: int, tpot_target_ms: float, prefill_tokens_per_s: float,
           decode_points: list[DecodePoint], max_num_seqs: int) -> Advice:
    """The xPyD split of `num_gpus` (>= 2) that sustains the highest rate within the TPOT target."""
    if num_gpus < 2:
        raise ValueError(f"a PD split needs at least 2 GPUs, got {num_gpus}")
    fit = fit_decode(decode_points)
    sequences = decode_capacity(fit, tpot_target_ms, max_num_seqs)
    per_prefill = prefill_tokens_per_s / input_len
    # a sequence holds its slot for output_len steps of (at most) the TPOT target
    per_decode = sequences / (output_len * max(fit.step_ms(sequences), 1e-9) / MS_PER_S) if sequences > 0 else 0.0
    splits = [
        SplitPrediction(prefill=x, decode=num_gpus - x, prefill_rate=x * per_prefill,
                        decode_rate=(num_gpus - x) * per_decode,
                        sustained_rate=min(x * per_prefill, (num_gpus - x) * per_decode))
        for x in range(1, num_gpus)
    ]
    best = max(splits, key=lambda s: (round(s.sustained_rate, 9), s.prefill))
    return Advice(num_gpus=num_gpus, input_len=input_len, output_len=output_len, tpot_target_ms=tpot_target_ms,
                  prefill_tokens_per_s=prefill_tokens_per_s, decode_fit=fit, decode_sequences=sequences,
                  splits=splits, best=best)
