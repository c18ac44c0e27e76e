"""OpenAI request bodies of the instance server and their translation to engine inputs.

Unknown fields are ignored (clients send many optional ones); fields vLLM knows and we cannot
honour fail with a 400 naming the parameter instead of being silently dropped
(server/unsupported_fields.py). Types are strict, as OpenAI's: `true` is not the integer 1 (a token id,
max_tokens, n) and "0.5" is not a number; only logit_bias's keys, JSON strings, are read as token ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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

from pdlaunch.engine.outputs import MAX_INT32, SamplingParams
from pdlaunch.engine.structured_output import StructuredOutput
from pdlaunch.errors import error_text
from pdlaunch.http import JsonObject, JsonValue
from pdlaunch.http.errors import OpenAIError, param_of
from pdlaunch.server.chat_template import ChatPrompt, template_message
from pdlaunch.server.structured_fields import opens_objects, structured_output_of
from pdlaunch.server.tool_calls import ToolCalling, tool_calling_of
from pdlaunch.server.unsupported_fields import refuse_unsupported, warn_ignored

DEFAULT_MAX_TOKENS = 16  # a completion that does not name max_tokens (OpenAI's and vLLM's default)
MAX_CHOICES = 128  # n, best_of: engine requests one HTTP request may start


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False
    continuous_usage_stats: bool = False

    @model_validator(mode="after")
    def _refuse_continuous_usage(self) -> StreamOptions:
        if self.continuous_usage_stats:
            raise OpenAIError(400, "stream_options.continuous_usage_stats is not supported; usage comes with the "
                                   "last chunk", param="stream_options.continuous_usage_stats")
        return self


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    model: str | None = None
    user: str | None = None  # the client's end-user id: no effect on the output (as in vLLM and OpenAI)
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
    kv_transfer_params: JsonObject | None = None
    prompt_logprobs: int | None = None  # engine/prompt_logprobs.py; completions' echo + logprobs asks too
    return_token_ids: bool = False  # vLLM's extension: choices carry the generated token ids

    chat: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: object) -> object:
        if isinstance(data, dict):
            refuse_unsupported(data, cls.chat)
            warn_ignored(data, cls._known_fields(), cls.chat)
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
        return _one_of(value, handler, "a string or a list of strings")

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        return self

    @classmethod
    def _known_fields(cls) -> set[str]:
        return {name for name, f in cls.model_fields.items()} | {f.alias for f in cls.model_fields.values() if f.alias}

    def structured_output(self) -> StructuredOutput | None:
        guided: JsonObject = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar}
        return structured_output_of(self.response_format, self.structured_outputs, guided)

    def _check_prompt_logprobs(self, asked: int | None, field: str) -> None:
        """Prompt logprobs come whole with the first output: not streamed (as vLLM refuses them with
        stream), and not on a PD decode, which loads the prompt's KV instead of computing it."""
        if asked is None:
            return
        if self.stream:
            raise OpenAIError(400, f"{field}: prompt logprobs are not available when stream=true", param=field)
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
            raise OpenAIError(400, f"{param}: {error_text(first)}", param=param) from None


def _one_of(value: object, handler: ValidatorFunctionWrapHandler, shapes: str) -> object:
    """A union field's value, or one error naming the field and its shapes (pydantic's name each union
    member: `prompt.str`, `prompt.list[int]`, ...)."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(f"must be {shapes} (got {_kind(value)})") from None


_JSON_KINDS: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object",
                                list: "list", type(None): "null"}


def _kind(value: object) -> str:
    """What a JSON value is, for an error: `an integer`, `a list of integers and strings`."""
    if isinstance(value, list):
        kinds = sorted({_JSON_KINDS.get(type(v), "value") for v in value})
        return f"a list of {' and '.join(k + 's' for k in kinds)}" if kinds else "an empty list"
    kind = _JSON_KINDS.get(type(value), "value")
    return kind if kind == "null" else ("an " if kind[0] in "aeiou" else "a ") + kind


_PASSED_THROUGH = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
                   "logit_bias", "allowed_token_ids", "bad_words", "include_stop_str_in_output",
                   "skip_special_tokens", "spaces_between_special_tokens")

PromptType = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    logprobs: int | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    echo: bool = False

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        return _one_of(value, handler, "a string, a list of strings, a list of token ids or a list of token-id lists")

    @model_validator(mode="after")
    def _choices(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise OpenAIError(400, f"best_of ({self.best_of}) must be greater than or equal to n ({self.n})",
                              param="best_of")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise OpenAIError(400, "best_of > n cannot be streamed", param="best_of")
        self._check_prompt_logprobs(self.prompt_logprobs, "prompt_logprobs")
        if self.echo and self.logprobs is not None:
            self._check_prompt_logprobs(self.logprobs, "echo")
        if self.max_tokens == 0 and not self.echo:
            raise OpenAIError(400, "max_tokens: 0 asks for no output, which only echo: true uses (the prompt and, with "
                                   "logprobs, its logprobs); send max_tokens of at least 1", param="max_tokens")
        if self.echo_only() and self.min_tokens:
            raise OpenAIError(400, f"min_tokens: min_tokens ({self.min_tokens}) must be less than or equal to "
                                   "max_tokens (0)", param="min_tokens")
        if self.echo_only() and self.stream:
            raise OpenAIError(400, "max_tokens: 0 with echo (the prompt only) is answered whole: send stream: false",
                              param="stream")
        return self

    def echo_only(self) -> bool:
        """echo with max_tokens 0 (vLLM's, as lm-evaluation-harness scores a prompt): the answer is the prompt
        (with logprobs, its logprobs), no output token. The engine samples one, which the answer leaves out."""
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request (a string or token ids): a list of strings or of token-id lists
        is a batch."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        ids = [x for x in prompt if isinstance(x, int)]
        if len(ids) == len(prompt):
            return [ids]
        return [p for p in prompt if not isinstance(p, int)]

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (the proxy counts its tokens); a 400 for a list of prompts."""
        prompts = self.prompts()
        if len(prompts) != 1:
            raise OpenAIError(400, "a list of prompts is answered by prompts(), not as one prompt", param="prompt")
        return prompts[0]

    def sampling_params(self) -> SamplingParams:
        # vLLM's rule: echo with logprobs asks for as many prompt logprobs as for output tokens.
        asked = self.prompt_logprobs if self.prompt_logprobs is not None or not self.echo else self.logprobs
        return self._sampling(1 if self.echo_only() else self.max_tokens, self.logprobs, asked)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[JsonObject] | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _text_parts(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """Only text parts exist for a text model; the error names the part (the field path names the message).
        A content of neither shape is named as such (pydantic's named each shape: `messages.0.content.str`)."""
        content = _one_of(value, handler, "a string, a list of content parts or null")
        for i, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type")
            if kind is None:
                raise ValueError(f'part {i} has no `type`; a text part is {{"type": "text", "text": "..."}}')
            if kind != "text":
                raise ValueError(f"part {i} has type {_short_json(kind)}, which this server does not take (it serves "
                                 'a text model): send text parts {"type": "text", "text": "..."} or a string')
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i} is a text part without a string `text`")
        return content

    def as_template_input(self, index: int) -> JsonObject:
        """This message as messages[`index`] goes to the chat template (errors name that index)."""
        content = self.content
        if isinstance(content, list):  # text parts (checked by _text_parts), joined
            content = "".join(str(part["text"]) for part in content)
        return template_message(self.role, content, self.model_extra or {}, index)


def _short_json(value: JsonValue) -> str:
    """A client's value quoted in an error, cut to a readable length."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_messages(messages: Sequence[ChatMessage]) -> None:
    """What OpenAI requires of a message beyond its shape: a tool message answers a call (`tool_call_id`);
    `name` and `tool_call_id`, when sent, are strings (the chat template would drop anything else)."""
    for i, message in enumerate(messages):
        extra = message.model_extra or {}
        for key in ("name", "tool_call_id"):
            if extra.get(key) is not None and not isinstance(extra[key], str):
                raise OpenAIError(400, f"messages.{i}.{key} must be a string", param=f"messages.{i}.{key}")
        if message.role == "tool" and extra.get("tool_call_id") is None:
            raise OpenAIError(400, f"messages.{i}: a tool message needs the tool_call_id of the call it answers",
                              param=f"messages.{i}.tool_call_id")


class ChatCompletionRequest(_SamplingFields):
    chat: ClassVar[bool] = True
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: JsonObject | None = None
    add_special_tokens: bool | None = None
    tools: JsonValue = None  # server/tool_calls.py reads these three
    tool_choice: JsonValue = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat_fields(self) -> ChatCompletionRequest:
        check_messages(self.messages)
        if self.top_logprobs not in (None, 0) and not self.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return self

    def tool_calling(self) -> ToolCalling | None:
        return tool_calling_of(self.tools, self.tool_choice, self.parallel_tool_calls)

    def structured_output(self) -> StructuredOutput | None:
        asked = super().structured_output()
        calling = self.tool_calling()
        forced = calling.structured_output() if calling is not None else None
        if forced is not None and opens_objects(self.structured_outputs):
            forced = forced.model_copy(update={"open_objects": True})
        if forced is not None and asked is not None:
            raise OpenAIError(400, f"tool_choice {calling.mode} and {asked.field} both constrain the output; "  # type: ignore[union-attr]
                                   "send one", param="tool_choice")
        return forced or asked

    def fills_context(self) -> bool:
        return self.max_tokens is None and self.max_completion_tokens is None

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        self._check_prompt_logprobs(self.prompt_logprobs, "prompt_logprobs")
        names = {"logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        return self._sampling(max_tokens, logprobs, self.prompt_logprobs, names)

    def template_messages(self) -> ChatPrompt:
        calling = self.tool_calling()
        return ChatPrompt([m.as_template_input(i) for i, m in enumerate(self.messages)], self.add_generation_prompt,
                          self.continue_final_message, calling.template_tools() if calling else None,
                          self.chat_template_kwargs, self.add_special_tokens)


Endpoint = Literal["completion", "chat"]
