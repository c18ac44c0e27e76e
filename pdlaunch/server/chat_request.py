"""`ChatCompletionRequest`: the body of /v1/chat/completions, and its messages (shared fields:
request_fields.py)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.structured_output import StructuredOutput
from pdlaunch.errors import error_text, json_kind
from pdlaunch.http import JsonObject, JsonValue
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.chat_template import ChatPrompt, template_message
from pdlaunch.server.request_fields import SamplingFields, one_of
from pdlaunch.server.structured_fields import checked, json_options
from pdlaunch.server.tool_calls import ToolCalling, tool_calling_of

# Content parts that carry text, and the key holding it (vLLM's text parts: OpenAI's text and an assistant's refusal,
# the Responses API's input_text / output_text).
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
# Messages one chat request (or /tokenize body) may send. vLLM sets no cap; a 16 MB body holds ~500,000 short ones,
# each validated and templated before the size check can refuse the lot (every message takes at least one token of
# max_model_len). 65,536 is more than any context fits as separate turns.
MAX_CHAT_MESSAGES = 65536


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[JsonObject] | None = None

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, data: object) -> object:
        """A message that is no JSON object is named as such (pydantic's words name this class)."""
        if not isinstance(data, (dict, cls)):
            raise ValueError(f'must be an object (got {json_kind(data)}), e.g. {{"role": "user", "content": "..."}}')
        return data

    @field_validator("content", mode="wrap")
    @classmethod
    def _text_parts(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """Only text parts exist for a text model; the error names the part (the field path names the message).
        A content of neither shape is named as such (pydantic's named each shape: `messages.0.content.str`)."""
        content = one_of(value, handler, "a string, a list of content parts or null")
        for i, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type")
            if kind is None:
                raise ValueError(f'part {i} has no `type`; a text part is {{"type": "text", "text": "..."}}')
            if not isinstance(kind, str) or kind not in TEXT_PARTS:
                raise ValueError(f"part {i} has type {_short_json(kind)}, which this server does not take (it serves "
                                 'a text model): send text parts {"type": "text", "text": "..."} or a string')
            if not isinstance(part.get(TEXT_PARTS[kind]), str):
                raise ValueError(f"part {i} is a {kind} part without a string `{TEXT_PARTS[kind]}`")
        return content

    def as_template_input(self, index: int) -> JsonObject:
        """This message as messages[`index`] goes to the chat template (errors name that index)."""
        content = self.content
        if isinstance(content, list):  # text parts (checked by _text_parts), one a line as vLLM joins them
            content = "\n".join(str(part[TEXT_PARTS[str(part["type"])]]) for part in content)
        return template_message(self.role, content, self.model_extra or {}, index)


def _short_json(value: JsonValue) -> str:
    """A client's value quoted in an error, cut to a readable length."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def capped_messages(value: object) -> object:
    """A chat's `messages` (before validation) when there are at most MAX_CHAT_MESSAGES of them; else a 400
    naming `messages`, before any message is validated."""
    if isinstance(value, list) and len(value) > MAX_CHAT_MESSAGES:
        raise ValueError(f"{len(value)} messages; a request takes at most {MAX_CHAT_MESSAGES} (a bound on the work "
                         "one request makes the server do validating and templating them before its size is "
                         "checked; each message takes at least one token of max_model_len): send fewer messages")
    return value


def check_messages(messages: Sequence[ChatMessage]) -> None:
    """What OpenAI requires of a message beyond its shape: a tool message answers a call (`tool_call_id`);
    `name`, `tool_call_id` and an assistant's reasoning, when sent, are strings (the chat template would drop
    anything else)."""
    for i, message in enumerate(messages):
        extra = message.model_extra or {}
        reasoning = ("reasoning", "reasoning_content") if message.role == "assistant" else ()  # others: unread
        for key in ("name", "tool_call_id", *reasoning):
            if extra.get(key) is not None and not isinstance(extra[key], str):
                raise OpenAIError(400, f"messages.{i}.{key} must be a string", param=f"messages.{i}.{key}")
        if message.role == "tool" and extra.get("tool_call_id") is None:
            raise OpenAIError(400, f"messages.{i}: a tool message needs the tool_call_id of the call it answers",
                              param=f"messages.{i}.tool_call_id")


class ChatCompletionRequest(SamplingFields):
    chat: ClassVar[bool] = True
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: JsonObject | None = None
    add_special_tokens: bool = False  # vLLM's default: the chat template renders the special tokens it wants
    documents: list[dict[str, str]] | None = None  # vLLM's: RAG documents for the chat template
    tools: JsonValue = None  # server/tool_calls.py reads these three
    tool_choice: JsonValue = None
    parallel_tool_calls: bool | None = None
    # vLLM's (default true): whether the answer carries the reasoning its reasoning parser split off. No parser runs
    # here (as vLLM without --reasoning-parser), so either value leaves the answer as it is.
    include_reasoning: bool | None = True

    @field_validator("messages", mode="before")
    @classmethod
    def _capped(cls, value: object) -> object:
        return capped_messages(value)

    @model_validator(mode="after")
    def _chat_fields(self) -> ChatCompletionRequest:
        check_messages(self.messages)
        if self.top_logprobs not in (None, 0) and not self.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return self

    def tool_calling(self) -> ToolCalling | None:
        calling = tool_calling_of(self.tools, self.tool_choice, self.parallel_tool_calls)
        if calling is not None and calling.mode == "auto" and self.asked_output() is not None:
            calling.answer_asked = True  # the asked output is the answer, not a call (tool_calls.py)
        return calling

    def asks_for_grammar(self) -> bool:
        """Also with tools: a required or named tool call's grammar is compiled as structured output's is."""
        return super().asks_for_grammar() or self.tools is not None

    def structured_output(self) -> StructuredOutput | None:
        """The output's one grammar: the asked one, a forced call's, or auto's strict calls' (the asked JSON answer
        one of its choices, tool_calls.py); a 400 naming the field whose grammar does not compile."""
        asked = self.asked_output()
        calling = self.tool_calling()
        forced = calling.structured_output(asked if calling.mode == "auto" else None) if calling is not None else None
        if forced is None or calling is None:
            return checked(asked) if asked is not None else None
        if asked is not None and calling.mode != "auto":
            raise OpenAIError(400, f"tool_choice {calling.mode} and {asked.field} both constrain the output; "
                                   "send one", param="tool_choice")
        options = json_options(self.structured_outputs)  # structured_outputs' JSON options apply to it too
        # Compiled here as an asked grammar is: a tool's schema that does not compile is a 400 naming that tool. A
        # required call's grammar is made of every tool's parameters; a named one's is its tool's alone (already
        # named so), which another tool's bad schema did not break; auto's of its strict tools' and the asked answer.
        parts = calling.grammar_parts() + ([asked] if asked is not None else [])
        return checked(forced.model_copy(update=options), [p.model_copy(update=options) for p in parts])

    def fills_context(self) -> bool:
        return self.max_tokens is None and self.max_completion_tokens is None

    def sampling_params(self) -> SamplingParams:
        if self.max_completion_tokens is not None and self.max_tokens is not None:
            self._check_max_tokens_beside()
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        self._check_prompt_logprobs(self.prompt_logprobs, "prompt_logprobs")
        names = {"logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        return self._sampling(max_tokens, logprobs, self.prompt_logprobs, names)

    def _check_max_tokens_beside(self) -> None:
        """max_tokens sent beside max_completion_tokens: the latter sets the limit (OpenAI's newer name; vLLM reads it
        and leaves max_tokens unread, whatever its value), but a max_tokens that no request may have is a 400 naming
        it, not dropped unread."""
        try:
            SamplingParams.model_validate({"max_tokens": self.max_tokens})
        except ValidationError as exc:
            raise OpenAIError(400, f"max_tokens: {error_text(exc.errors()[0])} (max_completion_tokens, sent as well, "
                                   "sets the limit: drop max_tokens or send a valid one)", param="max_tokens") from None

    def template_messages(self) -> ChatPrompt:
        calling = self.tool_calling()
        return ChatPrompt([m.as_template_input(i) for i, m in enumerate(self.messages)], self.add_generation_prompt,
                          self.continue_final_message, calling.template_tools() if calling else None,
                          self.chat_template_kwargs, self.add_special_tokens, self.documents)

