"""Request-facing types of the engine: sampling parameters in, request outputs out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationInfo, field_validator

from pdlaunch.engine.structured_output import StructuredOutput
from pdlaunch.errors import EngineError

# vLLM's thresholds (vllm/sampling_params.py): a temperature below SAMPLING_EPS is greedy; one in
# [SAMPLING_EPS, MIN_RANDOM_TEMPERATURE) is raised to MIN_RANDOM_TEMPERATURE, because dividing float32
# logits by less overflows to inf and the softmax turns into NaN (1e-40 sampled token 0 every time).
SAMPLING_EPS = 1e-5
MIN_RANDOM_TEMPERATURE = 1e-2
MAX_INT32 = 2**31 - 1
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
MIN_SEED = -(2**63)  # and a negative int64, as its two's complement (seed + 2**64)
MAX_STOPS = 256
MAX_STOP_CHARS = 4096
MAX_LOGIT_BIAS = 100.0  # OpenAI's range; vLLM clamps to it
MAX_TOKEN_LISTS = 4096  # entries of logit_bias / allowed_token_ids / bad_words


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
    # vLLM takes any int64 (torch.long) seed; torch.Generator.manual_seed takes a negative one as seed + 2**64
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    # Draws of the seed's stream skipped before the first token: the tokens of this seeded request drawn
    # elsewhere (a migrated stream's continuation: proxy/migrate.py); at most max_model_len (LLMEngine.add_request).
    seed_offset: int = Field(0, ge=0, le=MAX_INT32)
    # Bounded because every stop string and id is checked on the engine thread after every token.
    stop: list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] = Field(default_factory=list, max_length=MAX_STOPS)
    stop_token_ids: list[Annotated[int, Field(ge=0, le=MAX_INT32)]] = Field(default_factory=list,
                                                                            max_length=MAX_STOPS)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)  # top-n alternatives per token; 0 = chosen token only
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # the same for prompt tokens (engine/prompt_logprobs.py)
    # vLLM's ranges (vllm/sampling_params.py _verify_args).
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)  # vLLM: finite and > 0, no upper bound
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0, le=MAX_INT32)
    logit_bias: dict[Annotated[int, Field(ge=0, le=MAX_INT32)], float] = Field(default_factory=dict,
                                                                                max_length=MAX_TOKEN_LISTS)
    allowed_token_ids: list[Annotated[int, Field(ge=0, le=MAX_INT32)]] | None = Field(
        None, min_length=1, max_length=1 << 20)
    bad_words: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOPS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's default, True, keeps the fast tokenizer's own joining; False (with skip_special_tokens off) drops
    # what it puts between two adjacent added tokens (Tokenizer.decode).
    spaces_between_special_tokens: bool = True
    structured_output: StructuredOutput | None = None  # grammar the output must match

    @field_validator("temperature")
    @classmethod
    def _numerically_safe(cls, value: float) -> float:
        if value < SAMPLING_EPS:
            return 0.0
        return max(value, MIN_RANDOM_TEMPERATURE)

    @field_validator("logit_bias")
    @classmethod
    def _clamp_bias(cls, value: dict[int, float]) -> dict[int, float]:
        return {t: min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, b)) for t, b in value.items()}

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop cannot contain an empty string")
        return value

    @field_validator("seed")
    @classmethod
    def _minus_one_is_no_seed(cls, value: int | None) -> int | None:
        # vLLM's SamplingParams reads seed -1 as unset (clients send it for "random"): no generator of its own
        return None if value == -1 else value

    @field_validator("seed_offset")
    @classmethod
    def _offset_needs_seed(cls, value: int, info: ValidationInfo) -> int:
        if value and info.data.get("seed") is None:
            raise ValueError("seed_offset skips draws of a seed's stream: it needs a seed")
        if value and (info.data.get("temperature") == 0.0 or info.data.get("top_k") == 1):
            raise ValueError("seed_offset skips draws of a sampled request's seed, and a greedy request "
                             "(temperature 0 or top_k 1) draws nothing: drop seed_offset")
        return value

    @field_validator("min_tokens")
    @classmethod
    def _min_le_max(cls, value: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and value > max_tokens:
            raise ValueError(f"min_tokens ({value}) must be less than or equal to max_tokens ({max_tokens})")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def processes_logits(self) -> bool:
        """Whether the logits need more than temperature / top-k / top-p (engine/logits_processors.py)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens or self.logit_bias or self.allowed_token_ids is not None or self.bad_words)


class InstanceAsleep(EngineError):
    """add_request's refusal while the engine sleeps: the instance's state, not the request, is why (a server
    answers 503, which a proxy retries elsewhere, where a 400 would tell the client its request was wrong)."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # top-n alternatives, token_id -> logprob
    rank: int | None = None  # 1 + how many tokens are more likely (set for prompt tokens)


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
    stop_reason: int | str | None = None  # with finish_reason "stop": the stop token id or stop string (not EOS)
    error: str | None = None  # set with finish_reason == "error" (e.g. KV transfer failed)
    error_status: int = 500  # HTTP status a server should use for `error`
    error_param: str | None = None  # the request field `error` is about (the OpenAI error's `param`)
    new_logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (not KV loaded from a prefill)
    num_external_tokens: int = 0  # prompt tokens whose KV was loaded from a prefill
    prompt_recomputed: bool = False  # a remote prefill's KV could not be loaded: the prompt was computed here
    scheduled_at: float | None = None  # time.monotonic() when the request was first admitted
    num_preemptions: int = 0  # times the scheduler preempted it so far
    kv_transfer_params: dict[str, JsonValue] | None = None  # prefill side: what decode needs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first output, when asked (None first)


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
