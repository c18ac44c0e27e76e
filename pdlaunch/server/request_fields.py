"""The request fields completions and chat completions share (`SamplingFields`) and their translation to
`SamplingParams`.

Unknown fields are ignored (clients send many optional ones); fields vLLM knows and we cannot
honour fail with a 400 naming the parameter instead of being silently dropped
(server/unsupported_fields.py). Types are strict, as OpenAI's: `true` is not the integer 1 (a token id,
max_tokens, n) and "0.5" is not a number; only logit_bias's keys, JSON strings, are read as token ids. A null
is "not sent", as OpenAI's nullable fields have it, for the optional fields and for n, stream, logprobs, echo
and return_token_ids (NULL_IS_DEFAULT).
The requests themselves: completion_request.py, chat_request.py.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from pdlaunch.engine.kv_capacity import KVCapacity
from pdlaunch.engine.outputs import MAX_INT32, SamplingParams
from pdlaunch.engine.structured_output import StructuredOutput
from pdlaunch.errors import error_text, json_kind
from pdlaunch.http import JsonObject, JsonValue
from pdlaunch.http.errors import OpenAIError, param_of
from pdlaunch.server.structured_fields import asked_output_of, structured_output_of
from pdlaunch.server.unsupported_fields import json_short, refuse_unsupported, warn_ignored

DEFAULT_MAX_TOKENS = 16  # a completion that does not name max_tokens (OpenAI's and vLLM's default)
MAX_CHOICES = 128  # n, best_of: engine requests one HTTP request may start
# Fields whose null is their default (OpenAI's schema makes them nullable and vLLM types them `... | None`, so a
# client that writes every field, unset ones as null, sends `"stream": null`); typed here by their default.
NULL_IS_DEFAULT = ("n", "stream", "logprobs", "echo", "return_token_ids")
STREAM_INTERVAL_WHY = "a stream here sends each engine step's tokens as they come"
# The most top alternatives a token's logprobs may list (SamplingParams' bound, as vLLM's default --max-logprobs 20)
MAX_LOGPROBS: int = next(m.le for m in SamplingParams.model_fields["logprobs"].metadata if getattr(m, "le", None))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    # vLLM's (since vllm-project/vllm#36379) and OpenAI's default: `stream_options: {}` asks for no usage chunk. Both
    # keys take null as not sent, as vLLM types them `bool | None`.
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown(cls, data: object) -> object:
        """A key of neither (`include_usge`, a newer OpenAI option) is ignored, as vLLM ignores it, and named in the
        log as vLLM names it: a typo of include_usage would otherwise pass without a word."""
        if isinstance(data, dict):
            warn_ignored(data, cls.model_fields, chat=False, within="stream_options")
        return data

    @model_validator(mode="after")
    def _refuse_continuous_usage(self) -> StreamOptions:
        if self.continuous_usage_stats:
            raise OpenAIError(400, "stream_options.continuous_usage_stats is not supported; usage comes in one "
                                   "chunk at the end (stream_options.include_usage)",
                              param="stream_options.continuous_usage_stats")
        return self


class DecodeLimits(BaseModel):
    """pdlaunch's `decode_limits`: the output limits of the request's decode leg as its client sent them (a key it did
    not send is absent), which the PD proxy puts in the prefill leg (that asks for one token) so that the prefill
    refuses what its decode would before it computes the prompt (server/decode_limits.py), and the KV cache of the
    decode chosen for it, as that decode's /health says it (`kv_cache`; absent when the proxy knows none). Only a
    prefill leg's (kv_transfer_params.do_remote_decode) are read: elsewhere they describe no other leg
    (server/choices.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_tokens: int | None = Field(None, ge=0, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=0, le=MAX_INT32)
    min_tokens: int | None = Field(None, ge=0, le=MAX_INT32)
    kv_cache: KVCapacity | None = None


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    model: str | None = None
    user: str | None = None  # the client's end-user id: no effect on the output (as in vLLM and OpenAI)
    session_id: str | None = None  # vLLM's id shared by a conversation's requests: no effect on the output either
    # vLLM's options of its /render endpoints, which it ignores on completions and chat, as here
    return_token_offsets: bool | None = False
    return_mm_kwargs: bool | None = True
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    # pdlaunch's extension: the draws this seeded request's generator skips before its first token (its tokens
    # drawn elsewhere: the proxy sets it on a migrated stream's continuation); sample i of n skips them of seed + i
    seed_offset: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    logit_bias: dict[Annotated[int, Strict(False)], float] | None = None  # JSON keys are strings of token ids
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    response_format: JsonValue = None  # server/structured_fields.py reads these five
    structured_outputs: JsonValue = None
    # vLLM's older names for structured_outputs.json / .regex / .choice / .grammar
    guided_json: JsonValue = Field(None, description="a JSON schema the output follows")
    guided_regex: JsonValue = Field(None, description="a regular expression the output matches")
    guided_choice: JsonValue = Field(None, description="the output is one of these strings")
    guided_grammar: JsonValue = Field(None, description="a grammar the output follows")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's: the generated tokens a stream batches into one chunk (at least 1). A whole answer has no chunks: any
    # valid interval is taken there, as vLLM takes it; above 1 a stream is refused (_stream_interval_on_a_stream)
    stream_interval: int | None = None
    kv_transfer_params: JsonObject | None = None
    prompt_logprobs: int | None = None  # engine/prompt_logprobs.py; completions' echo + logprobs asks too
    return_token_ids: bool = False  # vLLM's extension: choices carry the generated token ids
    decode_limits: DecodeLimits | None = None  # pdlaunch's, on a PD prefill leg: its decode leg's (DecodeLimits)

    chat: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: object) -> object:
        if isinstance(data, dict):
            refuse_unsupported(data, cls.chat)
            warn_ignored(data, cls._known_fields(), cls.chat)
            return {k: v for k, v in data.items() if not (v is None and k in NULL_IS_DEFAULT)}
        return data

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_keys(cls, value: object) -> object:
        """Keys are token ids written as JSON strings; one that is not names itself (pydantic's own error read
        `logit_bias.abc.[key]: Input should be a valid integer`)."""
        for key in value if isinstance(value, dict) else ():
            token_id = isinstance(key, int) and not isinstance(key, bool) and key >= 0  # a Python caller's dict
            # ASCII digits only: "²" and "٣" are digits to str.isdigit, not integers to pydantic
            if not (token_id or (isinstance(key, str) and key.strip().isascii() and key.strip().isdigit())):
                raise ValueError(f"key {key!r} is not a token id: logit_bias maps token ids, written as strings "
                                 '(e.g. {"50256": -100}), to a bias')
        return value

    @field_validator("allowed_token_ids")
    @classmethod
    def _distinct_allowed(cls, value: list[int] | None) -> list[int] | None:
        """Each id once: the sampler masks a request's logits with every entry at every step, and a million copies
        of a few ids held the engine thread (every stream of the instance) for seconds a step."""
        return sorted(set(value)) if value is not None else None

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop_shape(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        return one_of(value, handler, "a string or a list of strings")

    @field_validator("stream_interval", mode="before")
    @classmethod
    def _positive_interval(cls, value: object) -> object:
        """vLLM's bound (an integer, at least 1), said in our words whether the request streams or not."""
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise OpenAIError(400, f"stream_interval must be a positive integer (the tokens a stream sends per "
                                   f"chunk), got {json_short(value)}; send 1 or more, or leave it out",
                              param="stream_interval")
        return value

    @model_validator(mode="after")
    def _stream_interval_on_a_stream(self) -> SamplingFields:
        if self.stream and self.stream_interval is not None and self.stream_interval > 1:
            raise OpenAIError(400, f"stream_interval is not supported by this server on a stream (got "
                                   f"{self.stream_interval}): {STREAM_INTERVAL_WHY}; leave it out or send 1",
                              param="stream_interval", code="unsupported_parameter")
        return self

    @model_validator(mode="before")
    @classmethod
    def _stream_options_need_stream(cls, data: object) -> object:
        """As vLLM: stream_options as sent (an unknown key counts) without `stream: true` is refused unless it is
        empty or null, which ask for nothing (a client that always sends `stream_options: {}` got a 400 here)."""
        if isinstance(data, dict) and data.get("stream_options") and not data.get("stream"):
            raise OpenAIError(400, f"stream_options is only allowed when stream is true (got "
                                   f"{json_short(data['stream_options'])} without stream: true); send stream: true, "
                                   "or leave stream_options out", param="stream_options")
        return data

    @classmethod
    def _known_fields(cls) -> set[str]:
        return {name for name, f in cls.model_fields.items()} | {f.alias for f in cls.model_fields.values() if f.alias}

    def asks_for_grammar(self) -> bool:
        """Whether the body names structured output, whose grammar sampling_params compiles (a long guided_choice
        list takes seconds): such a request is prepared off the event loop (server/completions.py)."""
        return any(value is not None for value in (self.response_format, self.structured_outputs, self.guided_json,
                                                   self.guided_regex, self.guided_choice, self.guided_grammar))

    def structured_output(self) -> StructuredOutput | None:
        return structured_output_of(self.response_format, self.structured_outputs, self._guided())

    def asked_output(self) -> StructuredOutput | None:
        """What the structured-output fields ask for, not compiled yet (chat joins it to strict tool calls)."""
        return asked_output_of(self.response_format, self.structured_outputs, self._guided())

    def _guided(self) -> JsonObject:
        return {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                "grammar": self.guided_grammar}

    def _check_prompt_logprobs(self, asked: int | None, field: str) -> None:
        """Prompt logprobs come whole with the first output: not streamed, and not on a PD decode, which loads the
        prompt's KV instead of computing it. vLLM refuses a stream's above 0 but takes 0 and sends none, dropping
        the field without a word: every value is refused here."""
        if asked is None:
            return
        if self.stream:
            raise OpenAIError(400, f"{field}: prompt logprobs are not available when stream=true (a stream's chunks "
                                   f"carry none); send stream=false to get them, or leave {field} out",
                              param=field)
        if (self.kv_transfer_params or {}).get("do_remote_prefill"):
            raise OpenAIError(400, f"{field}: prompt logprobs are computed where the prompt is; a PD decode loads "
                                   "its KV (ask a colocated instance)", param=field)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def fills_context(self) -> bool:
        """True when the request names no output limit that applies: its answer may run to the model's
        max_model_len (as in vLLM: a chat request without max_tokens / max_completion_tokens, a completion
        whose max_tokens is null; a completion without the field gets DEFAULT_MAX_TOKENS)."""
        return "max_tokens" in self.model_fields_set and self.max_tokens is None

    def _sampling(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                  names: dict[str, str] | None = None) -> SamplingParams:
        """`names`: the request field a SamplingParams field came from, where they differ (an error names it)."""
        for name, asked in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if asked == -1:  # vLLM's: every token of the vocabulary
                param = (names or {}).get(name, name)
                raise OpenAIError(400, f"{param}: -1 (vLLM: the logprobs of every token in the vocabulary) is not "
                                       f"supported here; send 0 to {MAX_LOGPROBS} (the chosen token and that many "
                                       "top alternatives)", param=param)
        values: dict[str, object] = {
            "prompt_logprobs": prompt_logprobs,
            # A request that fills the context is given its room once its prompt is tokenized
            # (server/choices.py); until then no limit, so min_tokens is not checked against a made-up one.
            "max_tokens": max_tokens if max_tokens is not None else MAX_INT32 if self.fills_context()
            else DEFAULT_MAX_TOKENS,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "seed_offset": self.seed_offset,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
            **{name: getattr(self, name) for name in _PASSED_THROUGH},
            "structured_output": self.structured_output(),
        }
        try:
            return SamplingParams.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = tuple(first.get("loc", ()))
            param = param_of(((names or {}).get(str(loc[0]), loc[0]), *loc[1:]) if loc else loc)
            # the limit as the client named it (min_tokens' bound: "... max_tokens (3)" of a max_completion_tokens)
            said = error_text(first).replace("max_tokens (", f"{(names or {}).get('max_tokens', 'max_tokens')} (")
            raise OpenAIError(400, f"{param}: {said}", param=param) from None


def one_of(value: object, handler: ValidatorFunctionWrapHandler, shapes: str) -> object:
    """A union field's value, or one error naming the field and its shapes (pydantic's name each union
    member: `prompt.str`, `prompt.list[int]`, ...)."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(f"must be {shapes} (got {json_kind(value)})") from None


_PASSED_THROUGH = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
                   "logit_bias", "allowed_token_ids", "bad_words", "include_stop_str_in_output",
                   "skip_special_tokens", "spaces_between_special_tokens")

Endpoint = Literal["completion", "chat"]
