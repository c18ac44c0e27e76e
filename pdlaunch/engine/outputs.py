"""Request-facing types of the engine: sampling parameters in, request outputs out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


# vLLM's thresholds (vllm/sampling_params.py): a temperature below SAMPLING_EPS is greedy; one in
# [SAMPLING_EPS, MIN_RANDOM_TEMPERATURE) is raised to MIN_RANDOM_TEMPERATURE, because dividing float32
# logits by less overflows to inf and the softmax turns into NaN (1e-40 sampled token 0 every time).
SAMPLING_EPS = 1e-5
MIN_RANDOM_TEMPERATURE = 1e-2
MAX_INT32 = 2**31 - 1
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
MAX_STOPS = 256
MAX_STOP_CHARS = 4096


class SamplingParams(BaseModel):
    """Per-request sampling. Invalid values raise a pydantic ValidationError naming the field.

    Every number is finite and bounded (NaN, Infinity and 100-digit integers are refused here,
    not somewhere inside a tensor), with vLLM's ranges.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_tokens: int = Field(16, ge=1, le=MAX_INT32)
    temperature: float = Field(1.0, ge=0.0)  # 0 (or below SAMPLING_EPS) = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, le=MAX_INT32)  # -1 or 0 = off
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    # Bounded because every stop string and id is checked on the engine thread after every token.
    stop: list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] = Field(default_factory=list, max_length=MAX_STOPS)
    stop_token_ids: list[Annotated[int, Field(ge=0, le=MAX_INT32)]] = Field(default_factory=list,
                                                                            max_length=MAX_STOPS)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)  # top-n alternatives per token; 0 = chosen token only

    @field_validator("temperature")
    @classmethod
    def _numerically_safe(cls, value: float) -> float:
        if value < SAMPLING_EPS:
            return 0.0
        return max(value, MIN_RANDOM_TEMPERATURE)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # top-n alternatives, token_id -> logprob


@dataclass
class RequestOutput:
    """A step's news about one request. `new_*` are what this step added."""

    request_id: str
    new_token_ids: list[int]
    new_text: str  # incremental text; stop strings are cut, partial stop matches held back
    output_token_ids: list[int]  # all generated so far
    text: str  # all generated text so far
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # set with finish_reason == "error" (e.g. KV transfer failed)
    error_status: int = 500  # HTTP status a server should use for `error`
    new_logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens not computed here (prefix cache or remote KV)
    kv_transfer_params: dict[str, Any] | None = None  # prefill side: what decode needs


@dataclass
class CompletionOutput:
    """One prompt's result from offline `LLM.generate`."""

    prompt: str | None  # None when the prompt was given as token ids
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0
