"""The settings of `pdlaunch bench compare` (every flag, checked before any deployment starts) and the kinds of
deployment it runs: colocated, PD, PD with per-request disaggregation, and the advised split."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from pdlaunch.bench.flag_numbers import flag, shown
from pdlaunch.bench.goodput import Slo
from pdlaunch.bench.serve_config import (
    BURSTINESS,
    MAX_PROMPTS,
    MAX_TOKENS,
    MAX_VOCAB,
    MIN_TOKEN_ID,
    SECONDS,
    SEED,
    TOKENS,
    VOCAB,
)
from pdlaunch.config.strict_model import MAX_SECONDS
from pdlaunch.launcher.readiness import READY_TIMEOUT_S

DeploymentKind = Literal["colocated", "pd", "conditional", "advised"]
KINDS: tuple[DeploymentKind, ...] = ("colocated", "pd")
BASELINE_FILES = ("compare.json", "colocated.json", "pd.json")  # what --baseline reads of an earlier --out
# Settings a --baseline run may change: the per-request disaggregation deployment's own, and where and how long.
BASELINE_FREE = frozenset({"out", "baseline", "disaggregate_min_tokens", "disaggregate_max_queue_tokens",
                           "disaggregate_max_itl_ms", "run_advised", "advise_for", "request_timeout", "ready_timeout"})
SloSet = Literal["relaxed", "tight"]
MILLISECONDS = "a positive number of milliseconds, e.g. 200"


class CompareConfig(BaseModel):
    """Every flag of `bench compare`; field names are the flag names (`input_len` -> `--input-len`)."""

    model: str
    device: Annotated[Literal["auto", "cpu", "cuda"], flag("auto, cpu or cuda")] = "auto"
    gpus: list[int] | None = None  # None: GPUs 0 .. prefill+decode-1
    rates: list[float] = Field(min_length=1)  # requests/s
    # the bounds of `bench serve`'s flags (ServeBenchConfig), checked here before any deployment starts
    num_prompts: Annotated[int, flag(f"a number of requests per rate from 1 to {MAX_PROMPTS}, e.g. 160")] = Field(
        160, ge=1, le=MAX_PROMPTS)
    # seconds of arrivals per rate: each rate sends round(rate x duration) requests instead of num_prompts, so a
    # high rate is measured over as long a stretch as a low one
    duration: Annotated[float | None, flag("a positive number of seconds, e.g. 60")] = Field(None, gt=0)
    input_len: Annotated[int, flag(f"{TOKENS}, e.g. 3072")] = Field(3072, ge=1, le=MAX_TOKENS)
    # a mix; replaces input_len
    input_lens: list[Annotated[int, Field(ge=1, le=MAX_TOKENS), flag(
        f"prompt lengths from 1 to {MAX_TOKENS} tokens, e.g. 64,3072")]] | None = Field(None, min_length=1)
    output_len: Annotated[int, flag(f"{TOKENS}, e.g. 128")] = Field(128, ge=1, le=MAX_TOKENS)
    ttft_slo_ms: Annotated[float, flag(MILLISECONDS)] = Field(400.0, gt=0)
    tpot_slo_ms: Annotated[float, flag(MILLISECONDS)] = Field(15.0, gt=0)
    tight_ttft_slo_ms: Annotated[float, flag(MILLISECONDS)] = Field(1000.0, gt=0)
    tight_tpot_slo_ms: Annotated[float, flag(MILLISECONDS)] = Field(10.0, gt=0)
    # whose TPOT target sizes the decode side
    advise_for: Annotated[SloSet, flag("relaxed (the SLOs of --ttft-slo-ms and --tpot-slo-ms) or tight (those of "
                                       "--tight-ttft-slo-ms and --tight-tpot-slo-ms)")] = "relaxed"
    run_advised: bool = True  # run the advised split when it is not the PD split already run
    # None: one per GPU (CPU: prefill + decode)
    colocated_instances: Annotated[int | None, flag("a positive number of instances, or drop the flag (one per "
                                                    "GPU; on CPU prefill + decode)")] = Field(None, ge=1)
    # also run PD with per-request disaggregation
    disaggregate_min_tokens: Annotated[int | None, flag("a positive number of prompt tokens, e.g. 256")] = Field(
        None, ge=1)
    # ... and in that deployment, spill PD prompts to the decode while the prefill queue holds this many tokens
    disaggregate_max_queue_tokens: Annotated[int | None, flag("a positive number of queued prompt tokens, e.g. "
                                                              "8192")] = Field(None, ge=1)
    # ... and no prompt on a decode whose streams wait this many ms per token (proxy.disaggregate_max_itl_ms)
    disaggregate_max_itl_ms: Annotated[float | None, flag(MILLISECONDS)] = Field(None, gt=0)
    prefill: Annotated[int, flag("a positive number of prefill instances, e.g. 1")] = Field(1, ge=1)
    decode: Annotated[int, flag("a positive number of decode instances, e.g. 1")] = Field(1, ge=1)
    burstiness: Annotated[float, flag(BURSTINESS)] = Field(1.0, gt=0)
    seed: Annotated[int, flag(SEED)] = Field(0, ge=0)
    num_warmups: Annotated[int, flag(f"a number of requests from 0 to {MAX_PROMPTS}, e.g. 2")] = Field(
        2, ge=0, le=MAX_PROMPTS)
    vocab_size: Annotated[int, flag(VOCAB)] = Field(500, gt=MIN_TOKEN_ID, le=MAX_VOCAB)
    max_model_len: Annotated[int | None, flag("a positive number of tokens (the longest prompt + output), or drop "
                                              "the flag")] = Field(None, ge=1)
    config: Path | None = None  # base deployment YAML; its instances/colocated are replaced
    # an earlier run's --out with the same workload: its colocated and PD runs are reused, only "conditional" runs
    baseline: Path | None = None
    # the proxy's request timeout is set 30 s above it, and a deployment takes no timeout over MAX_SECONDS
    request_timeout: Annotated[float, flag(f"{SECONDS} (at most {MAX_SECONDS - 30})")] = Field(
        600.0, gt=0, le=MAX_SECONDS - 30)
    ready_timeout: Annotated[float, flag(f"{SECONDS} (at most {MAX_SECONDS})")] = Field(
        READY_TIMEOUT_S, gt=0, le=MAX_SECONDS)
    out: Path

    @field_validator("rates")
    @classmethod
    def _positive_rates(cls, rates: list[float]) -> list[float]:
        bad = [r for r in rates if not (r > 0 and math.isfinite(r))]
        if bad:
            raise ValueError(f"{shown(bad[0])} is not a positive number of requests/s; give positive, finite rates, "
                             "e.g. 2,4,8")
        twice = [r for i, r in enumerate(rates) if r in rates[:i]]
        if twice:
            raise ValueError(f"{shown(twice[0])} is listed twice; give each rate once, e.g. 2,4,8")
        return sorted(rates)  # run lowest first, however typed

    @model_validator(mode="after")
    def _check_model(self) -> CompareConfig:
        if self.model not in ("demo", "tiny") and not Path(os.path.expanduser(self.model)).exists():
            raise ValueError(f"--model: {self.model!r} does not exist (give a local HF checkpoint, a .gguf file, "
                             "`demo` or `tiny`)")
        if self.config is not None and not self.config.is_file():
            raise ValueError(f"--config: {str(self.config)!r} is not a file")
        if self.input_lens is not None and self.input_len != type(self).model_fields["input_len"].default:
            raise ValueError("--input-len and --input-lens both set the prompt lengths: give one")
        if self.duration is not None and self.num_prompts != type(self).model_fields["num_prompts"].default:
            raise ValueError("--num-prompts and --duration both set how many requests a rate sends: give one")
        if self.duration is not None and self.prompts_at(len(self.rates) - 1) > MAX_PROMPTS:
            raise ValueError(f"--duration: {self.duration:g} s at {self.rates[-1]:g} req/s is "
                             f"{self.prompts_at(len(self.rates) - 1)} requests, more than {MAX_PROMPTS}; "
                             "give a shorter --duration")
        if self.disaggregate_max_queue_tokens is not None and self.disaggregate_min_tokens is None:
            raise ValueError("--disaggregate-max-queue-tokens applies to the per-request disaggregation "
                             "deployment: give --disaggregate-min-tokens N too")
        if self.disaggregate_max_itl_ms is not None and self.disaggregate_min_tokens is None:
            raise ValueError("--disaggregate-max-itl-ms applies to the per-request disaggregation "
                             "deployment: give --disaggregate-min-tokens N too")
        if self.baseline is not None:
            if self.disaggregate_min_tokens is None:
                raise ValueError("--baseline reuses an earlier run's colocated and PD deployments and runs only the "
                                 "per-request disaggregation one: give --disaggregate-min-tokens N too")
            missing = [name for name in BASELINE_FILES if not (self.baseline / name).is_file()]
            if missing:
                raise ValueError(f"--baseline: {str(self.baseline)!r} has no {missing[0]} (give the --out folder of "
                                 "an earlier `bench compare` that ran to its report)")
        return self

    def prompts_at(self, index: int) -> int:
        """Requests the rate at `index` sends: --num-prompts, or rate x --duration (at least one)."""
        if self.duration is None:
            return self.num_prompts
        return max(1, round(self.rates[index] * self.duration))

    @property
    def prompt_lens(self) -> list[int]:
        """The workload's prompt lengths: the mix of --input-lens, or --input-len alone."""
        return [*self.input_lens] if self.input_lens is not None else [self.input_len]

    @property
    def mean_input_len(self) -> int:
        """Prompt tokens per request, averaged over the mix (its lengths come in equal shares)."""
        return round(sum(self.prompt_lens) / len(self.prompt_lens))

    @property
    def kinds(self) -> tuple[DeploymentKind, ...]:
        """The deployments run before the advised one: colocated, PD, and PD with per-request disaggregation
        (with --baseline only the last: the others are the baseline's)."""
        if self.baseline is not None:
            return ("conditional",)
        return KINDS + (("conditional",) if self.disaggregate_min_tokens is not None else ())

    @property
    def slo(self) -> Slo:
        return Slo(ttft_ms=self.ttft_slo_ms, tpot_ms=self.tpot_slo_ms)

    @property
    def tight_slo(self) -> Slo:
        return Slo(ttft_ms=self.tight_ttft_slo_ms, tpot_ms=self.tight_tpot_slo_ms)

    def slo_of(self, which: SloSet) -> Slo:
        return self.slo if which == "relaxed" else self.tight_slo
